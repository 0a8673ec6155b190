"""SSF (Lian et al., NeurIPS 2022): scale and shift `y = x ⊙ γ + β` at the official placements
(dongzelian/SSF), all folded exactly into the weights by `apply`.

Per block: after LN1, after the fused qkv projection (3D: the concatenated q, k, v outputs incl.
bias), after the attention output projection, after LN2, after fc1 (before GELU) and after fc2;
plus the patch-embedding output (before CLS / position embedding) and the final-LN output.
Count `L(14D + 2M) + 4D` (ViT-B/16: 205,824).

Adapter paths::

    embedding/{ssf_scale, ssf_shift}                                              (D,)
    Transformer/encoderblock_{i}/LayerNorm_{0,1}/{ssf_scale, ssf_shift}           (D,)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/qkv/{ssf_scale, ssf_shift}  (3D,)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/out/{ssf_scale, ssf_shift}  (D,)
    Transformer/encoderblock_{i}/MlpBlock_0/Dense_0/{ssf_scale, ssf_shift}        (M,)
    Transformer/encoderblock_{i}/MlpBlock_0/Dense_1/{ssf_scale, ssf_shift}        (D,)
    Transformer/encoder_norm/{ssf_scale, ssf_shift}                               (D,)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from jax_peft import paths
from jax_peft.methods import layers, rescale
from jax_peft.methods.base import Method, Tree
from jax_peft.methods.simple import path_mask

ATTN = "MultiHeadDotProductAttention_0"
QKV = ("q", "k", "v")
# site name inside a block -> (kind, node path relative to the block)
_BLOCK_SITES = {
    "ln1": ("ln", layers.LN1),
    "qkv": ("qkv", f"{ATTN}/qkv"),
    "o": ("linear", layers.MODULES["o"]),
    "ln2": ("ln", layers.LN2),
    "fc1": ("linear", layers.MODULES["fc1"]),
    "fc2": ("linear", layers.MODULES["fc2"]),
}
_MODULE_OF_PATH = {p: m for m, p in layers.MODULES.items()}
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")


def _kind_of(node_path: str) -> tuple[str, int | None, str | None]:
    """(kind, block, module) of an adapter node path; raises on foreign paths."""
    if node_path == "embedding":
        return "patch", None, None
    if node_path == "Transformer/encoder_norm":
        return "ln", None, None
    m = _BLOCK.match(node_path)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        for kind, rel in _BLOCK_SITES.values():
            if rest == rel:
                return kind, i, _MODULE_OF_PATH.get(rest)
    raise ValueError(f"{node_path!r} is not an SSF adapter location")


@dataclasses.dataclass(frozen=True)
class SSF(Method):
    """SSF at the official placements.

    Hyper-parameters:
      init_scheme (option name `init`): "official" (γ ~ N(1, .02²), β ~ N(0, .02²)) or "identity"
        (γ = 1, β = 0: the pretrained model at step 0).
      sites: per-block placements, subset of ("ln1", "qkv", "o", "ln2", "fc1", "fc2").
      patch_ssf, final_ssf: SSF on the patch embedding / after the final norm.
      layers: blocks to adapt (None = all).
      targets: optional regex over the site node paths (see module docstring); must select something.
    """

    init_scheme: str = "official"
    sites: tuple[str, ...] = ("ln1", "qkv", "o", "ln2", "fc1", "fc2")
    patch_ssf: bool = True
    final_ssf: bool = True
    layers: tuple[int, ...] | None = None
    targets: str | None = None

    name: ClassVar[str] = "ssf"
    head_init: ClassVar[str] = "trunc_normal"
    hparam_aliases: ClassVar[Mapping[str, str]] = {"init": "init_scheme"}

    def __post_init__(self):
        if self.init_scheme not in ("official", "identity"):
            raise ValueError(f"ssf: unknown init {self.init_scheme!r}; use 'official' or 'identity'")
        s = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        bad = [x for x in s if x not in _BLOCK_SITES]
        if bad:
            raise ValueError(f"ssf: unknown site(s) {bad}; choose from {tuple(_BLOCK_SITES)}")
        object.__setattr__(self, "sites", s)
        if self.layers is not None:
            ls = (self.layers,) if isinstance(self.layers, int) else tuple(int(i) for i in self.layers)
            if not ls or min(ls) < 0:
                raise ValueError(f"ssf: `layers` must be non-empty block indices ≥ 0, got {self.layers!r}")
            object.__setattr__(self, "layers", ls)
        if self.targets is not None:
            try:
                re.compile(self.targets)
            except re.error as e:
                raise ValueError(f"ssf: invalid `targets` regex {self.targets!r}: {e}") from None

    def node_paths(self, depth: int) -> list[str]:
        """Adapter node paths for a model of this depth (raises when nothing is selected)."""
        layer_set = range(depth) if self.layers is None else self.layers
        over = [i for i in layer_set if i >= depth]
        if over:
            raise ValueError(f"ssf: `layers` {over} do not exist in a {depth}-block model")
        out = ["embedding"] if self.patch_ssf else []
        for i in sorted(layer_set):
            out += [f"{layers.block_path(i)}/{_BLOCK_SITES[s][1]}" for s in _BLOCK_SITES if s in self.sites]
        if self.final_ssf:
            out.append("Transformer/encoder_norm")
        if self.targets is not None and out:
            out = rescale.select_nodes(out, self.targets, what="ssf target")
        if not out:
            raise ValueError("ssf: the selection adapts nothing; enable some sites, patch_ssf or final_ssf")
        return out

    def _dim(self, params: Tree, node_path: str) -> int:
        kind, i, _ = _kind_of(node_path)
        if kind == "qkv":
            return sum(layers.in_out(params, i, m)[1] for m in QKV)
        return int(np.size(rescale.node(params, node_path)["bias"]))

    def init(self, rng: jax.Array, params: Tree) -> dict:
        nodes = self.node_paths(layers.num_blocks(params))
        flat: dict[str, Any] = {}
        for key, p in zip(jax.random.split(rng, len(nodes)), nodes):
            ssf = rescale.ssf_init(key, self._dim(params, p), self.init_scheme == "identity")
            flat[f"{p}/ssf_scale"], flat[f"{p}/ssf_shift"] = ssf["scale"], ssf["shift"]
        return paths.unflatten(flat)

    @staticmethod
    def site_leaves(adapter: Tree) -> list[tuple[str, str, int | None, str | None, Any, Any]]:
        """(node path, kind, block, module, γ, β) per adapted site of an adapter tree, leaves checked."""
        out = []
        for p, leaves in paths.group_by_node(adapter).items():
            if set(leaves) != {"ssf_scale", "ssf_shift"}:
                raise ValueError(f"ssf adapter at {p!r} has leaves {sorted(leaves)}, expected ssf_scale, ssf_shift")
            out.append((p, *_kind_of(p), leaves["ssf_scale"], leaves["ssf_shift"]))
        return out

    def apply(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict:
        flat = paths.flatten(params)
        for p, kind, i, module, g, b in self.site_leaves(adapter):
            try:
                if kind == "ln":
                    flat[f"{p}/scale"], flat[f"{p}/bias"] = rescale.scale_shift_affine(
                        flat[f"{p}/scale"], flat[f"{p}/bias"], g, b)
                elif kind == "patch":
                    flat[f"{p}/kernel"], flat[f"{p}/bias"] = rescale.scale_shift_conv(
                        flat[f"{p}/kernel"], flat[f"{p}/bias"], g, b)
                elif kind == "linear":
                    flat[f"{p}/kernel"], flat[f"{p}/bias"] = rescale.scale_shift_linear(
                        flat[f"{p}/kernel"], flat[f"{p}/bias"], module, g, b)
                else:  # fused qkv: γ, β cover [q | k | v] outputs
                    start = 0
                    for m in QKV:
                        mp = layers.module_path(i, m)
                        n = int(np.size(flat[f"{mp}/bias"]))
                        flat[f"{mp}/kernel"], flat[f"{mp}/bias"] = rescale.scale_shift_linear(
                            flat[f"{mp}/kernel"], flat[f"{mp}/bias"], m, g[start:start + n], b[start:start + n])
                        start += n
                    if start != np.size(g):
                        raise TypeError(f"qkv SSF has {np.size(g)} entries, q/k/v outputs total {start}")
            except KeyError as e:
                raise ValueError(f"ssf adapter location {p!r} has no parameter {e.args[0]!r} in params; "
                                 "the adapter was made for another model") from None
            except TypeError as e:
                raise ValueError(f"ssf adapter at {p!r} does not fit params: {e}") from None
        return paths.unflatten(flat)

    def decay_mask(self, trainable: Tree) -> Any:
        """Official SSF recipe: 1-D parameters and biases get no decay, so only the head kernel."""
        return path_mask(trainable, lambda p, x: np.ndim(x) >= 2 and not p.endswith("bias"))

    def summary(self) -> str:
        blocks = "all blocks" if self.layers is None else f"blocks {list(self.layers)}"
        extra = [n for n, on in (("patch embedding", self.patch_ssf), ("final norm", self.final_ssf)) if on]
        t = f"; restricted to paths matching {self.targets!r}" if self.targets else ""
        return (f"ssf (init={self.init_scheme}): y = x ⊙ γ + β after {', '.join(self.sites)} in {blocks}"
                + (f", and on the {' and '.join(extra)}" if extra else "") + t
                + ". Default count L(14D + 2M) + 4D (ViT-B/16: 205,824); folds exactly into the weights; "
                  "only the head kernel is weight-decayed.")
