"""LoRA (Hu et al., 2022) on ViT linears: `K' = K + s · A B`, s = alpha / rank.

Two layouts (methods.md §3.7):

* `variant="separate"` (the paper's description used in the VTAB tables' text): one pair per targeted
  module, A (in, r), B (r, out); default targets q and v.
* `variant="fused_qkv"` (NOAH's code, which produced the published LoRA numbers): one pair per block on
  the fused qkv projection, A (D, r), B (r, 3D); columns [0, D) of A B go to q, [D, 2D) to k,
  [2D, 3D) to v, so q, k and v all change and share A.

Init as PyTorch/NOAH: A kaiming-uniform(a=√5) = U(±1/√in), B = 0 (identity at init). Count for
ViT-B/16 r=8: 294,912 in both layouts. NOAH trains with Dropout(0.1) on the LoRA input; that noise
lives on activations, so it is available through `side_paths` (activation form), not `apply`.

Adapter paths::

    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,...}/{lora_a, lora_b}   separate
    Transformer/encoderblock_{i}/MlpBlock_0/Dense_{0,1}/{lora_a, lora_b}                       separate
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/qkv/{lora_a, lora_b}           fused_qkv
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jax_peft import paths
from jax_peft.methods import layers, rescale
from jax_peft.methods.base import Method, Tree
from jax_peft.methods.simple import path_mask

ATTN = "MultiHeadDotProductAttention_0"
QKV = ("q", "k", "v")
_MODULE_OF_PATH = {p: m for m, p in layers.MODULES.items()}
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")


@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """Hyper-parameters:
      rank: r ≥ 1 (must not exceed the smaller side of any targeted kernel).
      alpha: scale numerator, s = alpha / rank (None: alpha = rank, s = 1 as in NOAH).
      targets: modules for the separate variant, each a short name (q, k, v, o, fc1, fc2) or a regex
        over module paths such as `Transformer/encoderblock_3/MlpBlock_0/Dense_0`; each must match.
      variant: "separate" or "fused_qkv" (targets must stay at the default with fused_qkv).
      layers: blocks to adapt (None = all).
      dropout: rate on the LoRA input in the activation form (`side_paths`); `apply` is eval-exact.
    """

    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = ("q", "v")
    variant: str = "separate"
    layers: tuple[int, ...] | None = None
    dropout: float = 0.1

    name: ClassVar[str] = "lora"
    head_init: ClassVar[str] = "zeros"

    def __post_init__(self):
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"lora: rank must be a positive integer, got {self.rank!r}")
        if self.variant not in ("separate", "fused_qkv"):
            raise ValueError(f"lora: unknown variant {self.variant!r}; use 'separate' or 'fused_qkv'")
        t = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not t:
            raise ValueError("lora: `targets` is empty; e.g. targets=('q', 'v')")
        for p in t:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"lora: invalid target regex {p!r}: {e}") from None
        if self.variant == "fused_qkv" and t != ("q", "v"):
            raise ValueError("lora: variant='fused_qkv' adapts the fused q/k/v projection of every block; "
                             "leave `targets` at its default (use layers=... to restrict blocks)")
        object.__setattr__(self, "targets", t)
        if self.layers is not None:
            ls = (self.layers,) if isinstance(self.layers, int) else tuple(int(i) for i in self.layers)
            if not ls or min(ls) < 0:
                raise ValueError(f"lora: `layers` must be non-empty block indices ≥ 0, got {self.layers!r}")
            object.__setattr__(self, "layers", ls)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora: dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def _blocks(self, depth: int) -> list[int]:
        blocks = list(range(depth)) if self.layers is None else sorted(self.layers)
        over = [i for i in blocks if i >= depth]
        if over:
            raise ValueError(f"lora: `layers` {over} do not exist in a {depth}-block model")
        return blocks

    def node_paths(self, depth: int) -> list[str]:
        """Adapter node paths (module paths, or `.../qkv` for fused_qkv)."""
        blocks = self._blocks(depth)
        if self.variant == "fused_qkv":
            return [f"{layers.block_path(i)}/{ATTN}/qkv" for i in blocks]
        candidates = [layers.module_path(i, m) for i in blocks for m in layers.MODULES]
        chosen: set[str] = set()
        for t in self.targets:
            if t in layers.MODULES:
                chosen |= {layers.module_path(i, t) for i in blocks}
            else:
                chosen |= set(rescale.select_nodes(candidates, t, what="lora target"))
        return [c for c in candidates if c in chosen]

    def _dims(self, params: Tree, node_path: str) -> tuple[int, int]:
        i, module = _parse(node_path)
        if module == "qkv":
            d_in = layers.in_out(params, i, "q")[0]
            return d_in, sum(layers.in_out(params, i, m)[1] for m in QKV)
        return layers.in_out(params, i, module)

    def init(self, rng: jax.Array, params: Tree) -> dict:
        nodes = self.node_paths(layers.num_blocks(params))
        flat: dict[str, Any] = {}
        for key, p in zip(jax.random.split(rng, len(nodes)), nodes):
            d_in, d_out = self._dims(params, p)
            if self.rank > min(d_in, d_out):
                raise ValueError(f"lora: rank {self.rank} is larger than the width of {p} "
                                 f"({d_in} -> {d_out}); use rank ≤ {min(d_in, d_out)}")
            flat[f"{p}/lora_a"] = rescale.kaiming_uniform(key, (d_in, self.rank), d_in, a=5 ** 0.5)
            flat[f"{p}/lora_b"] = jnp.zeros((self.rank, d_out), jnp.float32)
        return paths.unflatten(flat)

    def increments(self, adapter: Tree) -> dict[str, tuple[jax.Array, jax.Array]]:
        """{module path: (A, s·B)} per adapted module (fused qkv split into q, k, v)."""
        out: dict[str, tuple[jax.Array, jax.Array]] = {}
        for node, leaves in paths.group_by_node(adapter).items():
            if set(leaves) != {"lora_a", "lora_b"}:
                raise ValueError(f"lora adapter at {node!r} has leaves {sorted(leaves)}, expected lora_a, lora_b")
            a, b = leaves["lora_a"], leaves["lora_b"]
            i, module = _parse(node)
            if module != "qkv":
                out[node] = (a, b * self.scale)
                continue
            d = b.shape[-1] // 3
            for j, m in enumerate(QKV):
                out[layers.module_path(i, m)] = (a, b[:, j * d:(j + 1) * d] * self.scale)
        return out

    def apply(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict:
        flat = paths.flatten(params)
        for mp, (a, b) in self.increments(adapter).items():
            kp = f"{mp}/kernel"
            if kp not in flat:
                raise ValueError(f"lora adapter targets {mp!r}, which params do not have")
            k = flat[kp]
            module = _MODULE_OF_PATH[mp.split("/", 2)[2]]
            km = layers.matrix_view(jnp.asarray(k, jnp.float32), module)
            delta = jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)
            if delta.shape != km.shape:
                raise ValueError(f"lora increment for {mp!r} has shape {delta.shape}, kernel is {km.shape}")
            flat[kp] = (km + delta).reshape(np.shape(k)).astype(jnp.result_type(k))
        return paths.unflatten(flat)

    def side_paths(self, adapter: Tree) -> dict[int, dict[str, Any]]:
        """Activation form for `ViT.apply(..., side=...)`: `x K + drop(x) A (s B)` with the LoRA input
        dropout of NOAH. (With fused_qkv, q/k/v draw separate dropout masks; NOAH draws one.)"""
        from jax_peft.vit import SidePath

        side: dict[int, dict[str, Any]] = {}
        for mp, (a, b) in self.increments(adapter).items():
            i = int(_BLOCK.match(mp).group(1))
            module = _MODULE_OF_PATH[mp.split("/", 2)[2]]
            side.setdefault(i, {})[module] = SidePath((a, b), scale=1.0, dropout=self.dropout, dropout_after=-1)
        return side

    def decay_mask(self, trainable: Tree) -> Any:
        """NOAH recipe: decay parameters with ndim ≥ 2 that are not biases (A, B, head kernel)."""
        return path_mask(trainable, lambda p, x: np.ndim(x) >= 2 and not p.endswith("bias"))

    def summary(self) -> str:
        blocks = "all blocks" if self.layers is None else f"blocks {list(self.layers)}"
        if self.variant == "fused_qkv":
            what = f"the fused qkv projection ({blocks}): A (D, r), B (r, 3D) shared by q, k, v; count L·r(D + 3D)"
        else:
            what = f"{', '.join(self.targets)} ({blocks}): A (in, r), B (r, out) each; count Σ r(in + out)"
        return (f"lora (r={self.rank}, scale={self.scale:g}, variant={self.variant}): K' = K + s·A B on {what}; "
                f"ViT-B/16 r=8 q,v: 294,912. A ~ U(±1/√in), B = 0 (identity at init); "
                f"input dropout {self.dropout} in the activation form.")


def _parse(node_path: str) -> tuple[int, str]:
    m = _BLOCK.match(node_path)
    if m:
        rest = m.group(2)
        if rest == f"{ATTN}/qkv":
            return int(m.group(1)), "qkv"
        if rest in _MODULE_OF_PATH:
            return int(m.group(1)), _MODULE_OF_PATH[rest]
    raise ValueError(f"{node_path!r} is not a LoRA adapter location")

