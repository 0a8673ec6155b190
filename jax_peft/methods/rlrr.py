"""RLRR (Dong et al., CVPR 2024): residual low-rank rescaling of every linear layer plus SSF.

For each selected linear (q, k, v, o, fc1, fc2 of a block; q/k/v separate), with kernel K (in, out):

    K' = K ⊙ (1 + s_in s_outᵀ)        s_in (in,), s_out (out,)      (paper: W + s_left ⊙ W ⊙ s_rightᵀ)
    b' = b + f                        f (out,)

and SSF `y = x ⊙ γ + β` after LayerNorm_0 and LayerNorm_1 of every selected block, after the final
encoder norm and on the patch-embedding output (before CLS / position embedding). Everything folds
into the weights exactly (LN-SSF into the LN affine, patch SSF into the conv, see `rescale`), so
`apply` is the merge.

Adapter paths (readable, mirroring the parameter tree)::

    embedding/{ssf_scale, ssf_shift}                                               (D,)
    Transformer/encoderblock_{i}/LayerNorm_{0,1}/{ssf_scale, ssf_shift}            (D,)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value,out}/{s_in, s_out, f}
    Transformer/encoderblock_{i}/MlpBlock_0/{Dense_0, Dense_1}/{s_in, s_out, f}
    Transformer/encoder_norm/{ssf_scale, ssf_shift}                                (D,)

Official names (zstarN70/RLRR `models/networks.py`): see `official_name`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jax_peft import paths
from jax_peft.methods import layers, rescale
from jax_peft.methods.base import Method, Tree
from jax_peft.methods.simple import path_mask

_OFFICIAL_MODULE = {"q": "attn.query", "k": "attn.key", "v": "attn.value", "o": "attn.out",
                    "fc1": "ffn.fc1", "fc2": "ffn.fc2"}
_MODULE_OF_PATH = {p: m for m, p in layers.MODULES.items()}
_LN_OFFICIAL = {layers.LN1: "attn_norm", layers.LN2: "ffn_norm"}
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted location. kind: 'linear' | 'ln' | 'final' | 'patch'; path: params node path."""

    kind: str
    path: str
    block: int | None = None
    module: str | None = None  # q, k, v, o, fc1, fc2 for linears; LayerNorm_0/1 for 'ln'


def _sites_of(depth: int, modules: Iterable[str], layer_set: Iterable[int], ln: bool, patch: bool,
              final: bool) -> list[Site]:
    out: list[Site] = []
    if patch:
        out.append(Site("patch", "embedding"))
    for i in sorted(layer_set):
        if ln:
            out += [Site("ln", f"{layers.block_path(i)}/{n}", i, n) for n in (layers.LN1, layers.LN2)]
        out += [Site("linear", layers.module_path(i, m), i, m) for m in layers.MODULES if m in modules]
    if final:
        out.append(Site("final", "Transformer/encoder_norm"))
    return out


def _site_of_path(node_path: str) -> Site:
    """Inverse of `Site.path` for adapter trees (raises on foreign paths)."""
    if node_path == "embedding":
        return Site("patch", node_path)
    if node_path == "Transformer/encoder_norm":
        return Site("final", node_path)
    m = _BLOCK.match(node_path)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if rest in (layers.LN1, layers.LN2):
            return Site("ln", node_path, i, rest)
        if rest in _MODULE_OF_PATH:
            return Site("linear", node_path, i, _MODULE_OF_PATH[rest])
    raise ValueError(f"{node_path!r} is not an RLRR adapter location")


_LEAVES = {"linear": ("s_in", "s_out", "f"), "ln": ("ssf_scale", "ssf_shift"),
           "final": ("ssf_scale", "ssf_shift"), "patch": ("ssf_scale", "ssf_shift")}


def official_name(site: Site, leaf: str) -> str:
    """Official PyTorch parameter name of one adapter leaf."""
    if site.kind == "linear":
        off = {"s_in": "scale_col", "s_out": "scale_line", "f": "shift_bias"}[leaf]
        return f"transformer.encoder.layer.{site.block}.{_OFFICIAL_MODULE[site.module]}.{off}"
    kind = leaf.split("_")[1]  # scale | shift
    if site.kind == "ln":
        return f"transformer.encoder.layer.{site.block}.ssf_{kind}_{_LN_OFFICIAL[site.module]}"
    if site.kind == "final":
        return f"transformer.encoder.ssf_{kind}_enc_norm"
    return f"transformer.embeddings.ssf_{kind}_patch"


def _official_shape(leaf: str, n: int) -> tuple[int, ...]:
    return {"s_in": (1, n), "s_out": (n, 1), "f": (1, n)}.get(leaf, (n,))


@dataclasses.dataclass(frozen=True)
class RLRR(Method):
    """RLRR with the official placements by default.

    Hyper-parameters:
      init_scheme (option name `init`): "official" (shipped kaiming-uniform scales, so the model does
        NOT start at the pretrained function: s_in ~ U(±√(6/in)), s_out ~ U(±√6), f = 0,
        SSF γ ~ N(1, .02²), β ~ N(0, .02²)) or "identity" (s_in as official, s_out = 0, f = 0,
        γ = 1, β = 0: exactly the pretrained model at step 0).
      modules: linears to rescale, subset of ("q", "k", "v", "o", "fc1", "fc2"); () for SSF only.
      ln_ssf, patch_ssf, final_ssf: SSF after LN_0/LN_1 of each selected block, on the patch
        embedding, after the final norm.
      layers: blocks to adapt (None = all), e.g. range(6, 12).
      targets: optional regex (re.search) over the node paths of the candidate sites (e.g.
        "MlpBlock_0" for FFN only, "LayerNorm" for LN-SSF only); must select something.
    """

    init_scheme: str = "official"
    modules: tuple[str, ...] = ("q", "k", "v", "o", "fc1", "fc2")
    ln_ssf: bool = True
    patch_ssf: bool = True
    final_ssf: bool = True
    layers: tuple[int, ...] | None = None
    targets: str | None = None

    name: ClassVar[str] = "rlrr"
    head_init: ClassVar[str] = "zeros"
    hparam_aliases: ClassVar[Mapping[str, str]] = {"init": "init_scheme"}

    def __post_init__(self):
        if self.init_scheme not in ("official", "identity"):
            raise ValueError(f"rlrr: unknown init {self.init_scheme!r}; use 'official' or 'identity'")
        mods = (self.modules,) if isinstance(self.modules, str) else tuple(self.modules)
        bad = [m for m in mods if m not in layers.MODULES]
        if bad:
            raise ValueError(f"rlrr: unknown module(s) {bad}; choose from {tuple(layers.MODULES)}")
        object.__setattr__(self, "modules", mods)
        if self.layers is not None:
            ls = (self.layers,) if isinstance(self.layers, int) else tuple(int(i) for i in self.layers)
            if not ls or min(ls) < 0:
                raise ValueError(f"rlrr: `layers` must be non-empty block indices ≥ 0, got {self.layers!r}")
            object.__setattr__(self, "layers", ls)
        if self.targets is not None:
            try:
                re.compile(self.targets)
            except re.error as e:
                raise ValueError(f"rlrr: invalid `targets` regex {self.targets!r}: {e}") from None

    # --- selection --------------------------------------------------------------------------
    def sites(self, depth: int) -> list[Site]:
        """Adapted locations for a model of this depth (raises when nothing is selected)."""
        layer_set = range(depth) if self.layers is None else self.layers
        over = [i for i in layer_set if i >= depth]
        if over:
            raise ValueError(f"rlrr: `layers` {over} do not exist in a {depth}-block model")
        sites = _sites_of(depth, self.modules, layer_set, self.ln_ssf, self.patch_ssf, self.final_ssf)
        if self.targets is not None and sites:
            keep = set(rescale.select_nodes([s.path for s in sites], self.targets, what="rlrr target"))
            sites = [s for s in sites if s.path in keep]
        if not sites:
            raise ValueError("rlrr: the selection adapts nothing; enable some modules, ln_ssf, "
                             "patch_ssf or final_ssf")
        return sites

    # --- contract ---------------------------------------------------------------------------
    def init(self, rng: jax.Array, params: Tree) -> dict:
        sites = self.sites(layers.num_blocks(params))
        identity = self.init_scheme == "identity"
        flat: dict[str, Any] = {}
        for key, s in zip(jax.random.split(rng, len(sites)), sites):
            if s.kind == "linear":
                d_in, d_out = layers.in_out(params, s.block, s.module)
                k1, k2 = jax.random.split(key)
                flat[f"{s.path}/s_in"] = rescale.kaiming_uniform(k1, (d_in,), d_in)
                flat[f"{s.path}/s_out"] = (jnp.zeros((d_out,), jnp.float32) if identity
                                           else rescale.kaiming_uniform(k2, (d_out,), 1))
                flat[f"{s.path}/f"] = jnp.zeros((d_out,), jnp.float32)
            else:
                node = rescale.node(params, s.path)
                dim = int(np.shape(node["bias"])[-1])
                ssf = rescale.ssf_init(key, dim, identity)
                flat[f"{s.path}/ssf_scale"], flat[f"{s.path}/ssf_shift"] = ssf["scale"], ssf["shift"]
        return paths.unflatten(flat)

    def apply(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict:
        flat = paths.flatten(params)
        for site, leaves in _group(adapter).items():
            _check_leaves(site, leaves)
            p = site.path
            try:
                if site.kind == "linear":
                    flat[f"{p}/kernel"] = rescale.rescale_kernel(flat[f"{p}/kernel"], site.module,
                                                                 leaves["s_in"], leaves["s_out"])
                    flat[f"{p}/bias"] = rescale.shift_bias(flat[f"{p}/bias"], leaves["f"])
                elif site.kind == "patch":
                    flat[f"{p}/kernel"], flat[f"{p}/bias"] = rescale.scale_shift_conv(
                        flat[f"{p}/kernel"], flat[f"{p}/bias"], leaves["ssf_scale"], leaves["ssf_shift"])
                else:
                    flat[f"{p}/scale"], flat[f"{p}/bias"] = rescale.scale_shift_affine(
                        flat[f"{p}/scale"], flat[f"{p}/bias"], leaves["ssf_scale"], leaves["ssf_shift"])
            except KeyError as e:
                raise ValueError(f"rlrr adapter location {p!r} has no parameter {e.args[0]!r} in params; "
                                 "the adapter was made for another model") from None
            except TypeError as e:  # shape mismatch inside jnp broadcasting
                raise ValueError(f"rlrr adapter at {p!r} does not fit params: {e}") from None
        return paths.unflatten(flat)

    def decay_mask(self, trainable: Tree) -> Any:
        """Official rule: no decay on names containing `bias` or `norm`, i.e. the shifts f, the
        LN-SSF γ/β (LN1, LN2, final) and the head bias; s_in, s_out, patch SSF, head kernel decay."""

        def decay(path: str, _: Any) -> bool:
            if path.startswith("head/"):
                return path.endswith("kernel")
            node_path, leaf = path.removeprefix("adapter/").rsplit("/", 1)
            if leaf == "f":
                return False
            return not (leaf.startswith("ssf_") and _site_of_path(node_path).kind in ("ln", "final"))

        return path_mask(trainable, decay)

    def summary(self) -> str:
        blocks = "all blocks" if self.layers is None else f"blocks {list(self.layers)}"
        parts = []
        if self.modules:
            parts.append(f"row/column rescale K ⊙ (1 + s_in s_outᵀ) and bias shift of "
                         f"{', '.join(self.modules)} ({blocks}; in + 2·out each)")
        if self.ln_ssf:
            parts.append(f"SSF after LN1 and LN2 ({blocks}; 2D each)")
        if self.patch_ssf:
            parts.append("SSF on the patch embedding (2D)")
        if self.final_ssf:
            parts.append("SSF after the final norm (2D)")
        t = f"; restricted to paths matching {self.targets!r}" if self.targets else ""
        return (f"rlrr (init={self.init_scheme}): " + "; ".join(parts) + t
                + ". Full default count L(19D + 3M) + 4D (ViT-B/16: 288,768). Folds exactly into the weights.")

    # --- official layout --------------------------------------------------------------------
    def from_official(self, state_dict: Mapping[str, Any], params: Tree | None = None) -> dict:
        """Adapter from an official RLRR state dict (numpy arrays). `params` fixes the depth and
        the expected shapes; without it the depth is read from the names. Backbone and head
        tensors are ignored; missing, mis-shaped or unknown RLRR tensors raise one error."""
        sd = {re.sub(r"^module\.", "", k): v for k, v in state_dict.items()}
        if params is not None:
            depth = layers.num_blocks(params)
        else:
            idx = [int(m.group(1)) for k in sd if (m := re.match(r"transformer\.encoder\.layer\.(\d+)\.", k))]
            depth = max(idx) + 1 if idx else 0
        sites = self.sites(depth)
        expected: dict[str, tuple[str, tuple[int, ...] | None]] = {}
        for s in sites:
            for leaf in _LEAVES[s.kind]:
                shape = None
                if params is not None:
                    if s.kind == "linear":
                        d_in, d_out = layers.in_out(params, s.block, s.module)
                        n = d_in if leaf == "s_in" else d_out
                    else:
                        n = int(np.shape(rescale.node(params, s.path)["bias"])[-1])
                    shape = _official_shape(leaf, n)
                expected[official_name(s, leaf)] = (f"{s.path}/{leaf}", shape)
        problems, flat = [], {}
        for name, (path, shape) in expected.items():
            if name not in sd:
                problems.append(f"missing {name}")
                continue
            arr = np.asarray(sd[name])
            leaf = path.rsplit("/", 1)[1]
            ok_rank = arr.ndim == len(_official_shape(leaf, 1)) and (
                leaf not in ("s_in", "f") or arr.shape[0] == 1) and (leaf != "s_out" or arr.shape[-1] == 1)
            if (shape is not None and arr.shape != shape) or not ok_rank:
                want = shape or _official_shape(leaf, -1)
                problems.append(f"{name} has shape {arr.shape}, expected {want}")
                continue
            flat[path] = jnp.asarray(arr.reshape(-1), jnp.float32)
        rlrr_like = re.compile(r"(scale_col|scale_line|shift_bias|ssf_scale|ssf_shift)")
        unknown = sorted(k for k in sd if rlrr_like.search(k) and k not in expected)
        problems += [f"unexpected {k}" for k in unknown]
        if problems:
            raise ValueError(
                f"rlrr: the state dict does not match this RLRR configuration ({len(problems)} problem(s)): "
                + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else "")
                + ". Check the depth/width of params and the method options (modules, layers, *_ssf).")
        return paths.unflatten(flat)

    def to_official(self, tree: Tree) -> dict[str, np.ndarray]:
        """Flat {official name: array} in the official layouts (scale_col (1, in), scale_line
        (out, 1), shift_bias (1, out), SSF (D,)). Works on adapters and their gradients; a tree
        {"adapter": ..., "head": ...} also maps the head to `head.weight` (C, D) / `head.bias`."""
        out: dict[str, np.ndarray] = {}
        adapter = tree
        if set(tree) == {"adapter", "head"}:
            adapter = tree["adapter"]
            out["head.weight"] = np.asarray(tree["head"]["kernel"]).T
            out["head.bias"] = np.asarray(tree["head"]["bias"])
        for site, leaves in _group(adapter).items():
            _check_leaves(site, leaves)
            for leaf, v in leaves.items():
                v = np.asarray(v)
                out[official_name(site, leaf)] = v.reshape(_official_shape(leaf, v.size))
        return out


def _group(adapter: Tree) -> dict[Site, dict[str, Any]]:
    return {_site_of_path(p): leaves for p, leaves in paths.group_by_node(adapter).items()}


def _check_leaves(site: Site, leaves: Mapping[str, Any]) -> None:
    want = set(_LEAVES[site.kind])
    if set(leaves) != want:
        raise ValueError(f"rlrr adapter at {site.path!r} has leaves {sorted(leaves)}, expected {sorted(want)}")
