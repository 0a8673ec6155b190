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
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from jax_peft import paths
from jax_peft import sites as sites_lib
from jax_peft.methods import rescale
from jax_peft.methods.base import Method, Tree, check_placements, select_blocks
from jax_peft.methods.edits import OutputAffine
from jax_peft.methods.simple import path_mask
from jax_peft.sites import Site

# per-block placements: local site names (ln1 / ln2 are the norms before attention / MLP)
BLOCK_SITES = ("ln1", "qkv", "o", "ln2", "fc1", "fc2")


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
    edit_kinds: ClassVar[tuple[type, ...]] = (OutputAffine,)

    def __post_init__(self):
        check_placements(self, "sites", BLOCK_SITES, "site")

    def select(self, params: Tree) -> list[Site]:
        """Adapted sites in the backbone's order (raises when nothing is selected)."""
        all_sites = sites_lib.sites(params)
        blocks = set(select_blocks(all_sites, self.layers, self.name))
        chosen = [s for s in all_sites.values()
                  if (s.kind == "patch" and self.patch_ssf)
                  or (s.block is None and s.kind == "norm" and self.final_ssf)
                  or (s.block in blocks and s.local in self.sites)]
        if self.targets is not None and chosen:
            keep = {s.name for s in sites_lib.select({s.name: s for s in chosen}, pattern=self.targets,
                                                     what="ssf target")}
            chosen = [s for s in chosen if s.name in keep]
        if not chosen:
            raise ValueError("ssf: the selection adapts nothing; enable some sites, patch_ssf or final_ssf")
        return chosen

    def init(self, rng: jax.Array, params: Tree) -> dict:
        chosen = self.select(params)
        flat: dict[str, Any] = {}
        for key, s in zip(jax.random.split(rng, len(chosen)), chosen):
            ssf = rescale.ssf_init(key, s.d_out, self.init_scheme == "identity")
            flat[f"{s.node}/ssf_scale"], flat[f"{s.node}/ssf_shift"] = ssf["scale"], ssf["shift"]
        return paths.unflatten(flat)

    def edits(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict[str, OutputAffine]:
        """OutputAffine (γ, β) per adapted site: folded into the linears, norms and patch kernel in the
        weight form; on the outputs of the q|k|v, o, fc1 and fc2 linears in the activation form."""
        by_node = {s.node: s for s in self.select(params)}
        return {by_node[node].name: OutputAffine(lv["ssf_scale"], lv["ssf_shift"])
                for node, lv in paths.group_by_node(adapter).items()}

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
