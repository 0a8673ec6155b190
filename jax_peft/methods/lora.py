"""LoRA (Hu et al., 2022) on ViT linears: `K' = K + s · A B`, s = alpha / rank.

Two layouts (methods.md §3.7):

* `variant="separate"` (the paper's description used in the VTAB tables' text): one pair per targeted
  module, A (in, r), B (r, out); default targets q and v.
* `variant="fused_qkv"` (NOAH's code, which produced the published LoRA numbers): one pair per block on
  the fused qkv projection, A (D, r), B (r, 3D); columns [0, D) of A B go to q, [D, 2D) to k,
  [2D, 3D) to v, so q, k and v all change and share A.

Init as PyTorch/NOAH: A kaiming-uniform(a=√5) = U(±1/√in), B = 0 (identity at init). Count for
ViT-B/16 r=8: 294,912 in both layouts. NOAH trains with Dropout(0.1) on the LoRA input; that noise
lives on activations, so it is available in the activation form (`jax_peft.methods.activation`), not `apply`.

Adapter paths::

    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,...}/{lora_a, lora_b}   separate
    Transformer/encoderblock_{i}/MlpBlock_0/Dense_{0,1}/{lora_a, lora_b}                       separate
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/qkv/{lora_a, lora_b}           fused_qkv
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jax_peft import paths
from jax_peft import sites as sites_lib
from jax_peft.methods import rescale
from jax_peft.methods.base import (
    Method,
    Tree,
    check_blocks,
    check_number,
    check_positive_int,
    check_rate,
    check_regexes,
    select_blocks,
)
from jax_peft.methods.edits import LowRank
from jax_peft.methods.simple import path_mask

LINEAR = ("q", "k", "v", "o", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """Hyper-parameters:
      rank: r ≥ 1 (must not exceed the smaller side of any targeted kernel).
      alpha: scale numerator, s = alpha / rank, a finite non-zero number (None: alpha = rank, s = 1 as in NOAH).
      targets: modules for the separate variant, each a site kind (q, k, v, o, fc1, fc2) or a regex
        over site names / parameter paths such as `block3/fc1` or `Transformer/encoderblock_3/MlpBlock_0/Dense_0`;
        each must match.
      variant: "separate" or "fused_qkv" (targets must stay at the default with fused_qkv).
      layers: blocks to adapt (None = all).
      dropout: rate on the LoRA input in the activation form; `apply` is eval-exact.
    """

    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = ("q", "v")
    variant: str = "separate"
    layers: tuple[int, ...] | None = None
    dropout: float = 0.1

    name: ClassVar[str] = "lora"
    head_init: ClassVar[str] = "zeros"
    edit_kinds: ClassVar[tuple[type, ...]] = (LowRank,)

    def __post_init__(self):
        check_positive_int(self.rank, "rank", self.name)
        if self.alpha is not None:
            check_number(self.alpha, "alpha", self.name)
        if self.variant not in ("separate", "fused_qkv"):
            raise ValueError(f"lora: unknown variant {self.variant!r}; use 'separate' or 'fused_qkv'")
        t = check_regexes(self.targets, "targets", self.name)
        if self.variant == "fused_qkv" and t != ("q", "v"):
            raise ValueError("lora: variant='fused_qkv' adapts the fused q/k/v projection of every block; "
                             "leave `targets` at its default (use layers=... to restrict blocks)")
        object.__setattr__(self, "targets", t)
        object.__setattr__(self, "layers", check_blocks(self.layers, self.name))
        check_rate(self.dropout, "dropout", self.name)

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def select(self, params: Tree) -> list[sites_lib.Site]:
        """The adapted sites, in the backbone's order (raises when a target matches nothing)."""
        all_sites = sites_lib.sites(params)
        blocks = select_blocks(all_sites, self.layers, self.name)
        if self.variant == "fused_qkv":
            return sites_lib.select(all_sites, kinds=("qkv",), blocks=blocks)
        candidates = {s.name: s for s in sites_lib.select(all_sites, kinds=LINEAR, blocks=blocks)}
        chosen: set[str] = set()
        for t in self.targets:
            kinds = (t,) if t in LINEAR else None
            pattern = None if t in LINEAR else t
            chosen |= {s.name for s in sites_lib.select(candidates, kinds=kinds, pattern=pattern, what="lora target")}
        return [s for s in candidates.values() if s.name in chosen]

    def init(self, rng: jax.Array, params: Tree) -> dict:
        chosen = self.select(params)
        flat: dict[str, Any] = {}
        for key, s in zip(jax.random.split(rng, len(chosen)), chosen):
            d_in, d_out = s.shape
            if self.rank > min(d_in, d_out):
                raise ValueError(f"lora: rank {self.rank} is larger than the width of {s.name} "
                                 f"({d_in} -> {d_out}); use rank ≤ {min(d_in, d_out)}")
            flat[f"{s.node}/lora_a"] = rescale.kaiming_uniform(key, (d_in, self.rank), d_in, a=5 ** 0.5)
            flat[f"{s.node}/lora_b"] = jnp.zeros((self.rank, d_out), jnp.float32)
        return paths.unflatten(flat)

    def edits(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict[str, LowRank]:
        """`x K + s · drop(x) A B` on every adapted site (the fused variant: one path on the qkv site,
        so q, k and v share the input dropout mask, as NOAH's code)."""
        by_node = {s.node: s for s in self.select(params)}
        return {by_node[node].name: LowRank((leaves["lora_a"], leaves["lora_b"]), scale=self.scale,
                                            dropout=float(self.dropout), dropout_after=-1)
                for node, leaves in paths.group_by_node(adapter).items()}

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
