"""EFFT (Chen et al., "EFFT: Effective Factor-Tuning"): one factorized increment for the whole ViT.

Adapter leaves (Flax kernel layout, `y = x K + b`; the official tensors already use it):

    u1 (D, r), v1 (r, D), c1 (r, r, 4)      attention pair and cores, order q, k, v, o
    u2 (D, r), v2 (r, M), c2 (r, r, 2)      MLP pair and cores, order fc1, fc2

Increments, for every block ℓ (scalar hyper-parameter s):

    ΔK_{q,k,v,o} = s · u1 c1[:, :, j] v1                   j = 0..3
    ΔK_fc1       = s · u2 c2[:, :, 0] v2                   (D, M)
    ΔK_fc2       = s · (u2 c2[:, :, 1] v2)ᵀ                (M, D)

`variant="shared"` (default) is the released code: the increments above are identical in every block
(count 3Dr + Mr + 6r², ViT-B/16 5376r + 6r²: r=16 87,552, r=32 178,176). `variant="per_layer"` gives
each block its own core slices, c1 (r, r, 4L) and c2 (r, r, 2L), block ℓ using c1[:, :, 4ℓ:4ℓ+4] and
c2[:, :, 2ℓ:2ℓ+2] (count 3Dr + Mr + 6Lr², ViT-B/16 r=32 245,760); this is the variant that matches the
paper's parameter counts (methods.md §3.5, an inference, not released code).

Init (option `init`, stored as the field `init_scheme`; two characters, as the official `init` string): the first character is for the
attention pair (u1, v1), the second for the MLP pair (u2, v2); "v" ⇒ that pair's v factor starts at 0
and u is xavier-uniform, "u" ⇒ u starts at 0 and v is xavier-uniform. Cores are xavier-uniform
(PyTorch fans: c1 ±√(6/(8r)), c2 ±√(6/(4r)) for the shared shapes). One factor of each pair is zero, so
the model starts at the pretrained function.

Training noise (`dropout`, 0.1 officially) acts on the factor **entries** (inverted dropout, kept
entries scaled by 1/(1 - p)), so it lives in the weights and the weight form is exact:
`apply(params, adapter, rng=key)` draws, for every block, one mask each for u1, c1 (the block's 4
slices) and v1, shared by q, k, v and o; and fresh masks for fc1's (u2, c2[:, :, 0], v2) and for fc2's
(u2, c2[:, :, 1], v2): 9 masks per block, as the official forward calls `Dropout` nine times. Block ℓ's
masks come from `jax.random.fold_in(rng, ℓ)`. `rng=None` (eval, merge) applies no dropout.

Official layout (`from_official` / `to_official`): `EFFTu1`, `EFFTv1`, `EFFTc1`, `EFFTu2`, `EFFTv2`,
`EFFTc2`, same shapes and layouts as above (the official module hard-codes D = 768, M = 3072). The
per-layer variant exports c1/c2 with 4L/2L slices; importing accepts at least 4L/2L slices and uses
the first ones (the repository's SSF-combined file carries 48/24).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jax_peft.methods import lowrank as lr
from jax_peft.methods.base import BackboneVariants, Method, check_choice, check_number, check_positive_int, check_rate
from jax_peft.methods.edits import LowRank

Tree = Mapping[str, Any]
ATTN = ("q", "k", "v", "o")
MODULES = ATTN + ("fc1", "fc2")
LEAVES = ("u1", "v1", "c1", "u2", "v2", "c2")
_VARIANTS = ("shared", "per_layer")
_OFFICIAL = {n: f"EFFT{n}" for n in LEAVES}

Factors = tuple[jax.Array, jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class EFFT(BackboneVariants, Method):
    """EFFT with hyper-parameters rank, scale, init ("vv", "vu", "uv", "uu"), dropout (on factor
    entries) and variant ("shared" as released, or "per_layer" cores). See the module docstring."""

    name: ClassVar[str] = "efft"
    head_init: ClassVar[str] = "torch_linear"

    hparam_aliases: ClassVar[Mapping[str, str]] = {"init": "init_scheme"}
    edit_kinds: ClassVar[tuple[type, ...]] = (LowRank,)
    variants: ClassVar[Mapping[str, str]] = {"swin": "efft_swin"}  # the released stage-shared Swin code

    rank: int = 16
    scale: float = 1.0
    init_scheme: str = "vv"  # option name `init` (a field named init would shadow Method.init)
    dropout: float = 0.1
    variant: str = "shared"

    def __post_init__(self) -> None:
        check_positive_int(self.rank, "rank", self.name)
        check_rate(self.dropout, "dropout", self.name)
        check_choice(self.variant, _VARIANTS, "variant", self.name)
        if not (isinstance(self.init_scheme, str) and len(self.init_scheme) == 2
                and set(self.init_scheme) <= {"u", "v"}):
            raise ValueError(f"efft: init must be two characters from 'u'/'v' (first: attention pair, second: "
                             f"MLP pair; 'v' = v factor starts at zero), e.g. 'vv' or 'vu'; got {self.init_scheme!r}")
        check_number(self.scale, "scale", self.name)

    # --- shapes --------------------------------------------------------------------------------
    def _shapes(self, params: Tree) -> tuple[int, int, int]:
        d, m, depth = lr.width_mlp_depth(params)
        lr.check_rank_width(self.rank, d, self.name)
        return d, m, depth

    def _slices(self, depth: int) -> tuple[int, int]:
        return (4, 2) if self.variant == "shared" else (4 * depth, 2 * depth)

    def adapter_hint(self) -> str:
        return ("The cores have 4/2 slices (variant='shared') or 4L/2L slices (variant='per_layer') for depth L; "
                "u/v follow the rank and widths. ")

    def _check(self, adapter: Tree) -> None:
        if set(adapter) != set(LEAVES):
            raise ValueError(f"efft expects adapter leaves {list(LEAVES)}, got {sorted(adapter)}")

    def _depth_of(self, adapter: Tree, depth: int) -> None:
        want = self._slices(depth)
        got = (adapter["c1"].shape[-1], adapter["c2"].shape[-1])
        if got != want:
            raise ValueError(f"efft (variant={self.variant!r}): cores have {got[0]}/{got[1]} slices, a depth-{depth} "
                             f"model needs {want[0]}/{want[1]}; build the adapter for this model and variant")

    # --- method --------------------------------------------------------------------------------
    def init(self, rng: jax.Array, params: Tree) -> dict:
        d, m, depth = self._shapes(params)
        r = self.rank
        n1, n2 = self._slices(depth)
        k = jax.random.split(rng, 4)
        shapes = {"u1": (d, r), "v1": (r, d), "u2": (d, r), "v2": (r, m)}
        zero = {"u1" if self.init_scheme[0] == "u" else "v1", "u2" if self.init_scheme[1] == "u" else "v2"}
        out = {}
        for key, (name, shape) in zip(jax.random.split(k[0], 4), shapes.items()):
            out[name] = jnp.zeros(shape, jnp.float32) if name in zero else lr.xavier_uniform(key, shape)
        out["c1"] = lr.xavier_uniform(k[1], (r, r, n1))
        out["c2"] = lr.xavier_uniform(k[2], (r, r, n2))
        return {n: out[n] for n in LEAVES}

    def factors(self, adapter: Tree, depth: int, rng: jax.Array | None = None) -> dict[int, dict[str, Factors]]:
        """{block: {module: (a, b, c)}} with ΔK = s · a @ b @ c in (in, out) layout (fc2 is given as
        (v2ᵀ, c2[:, :, 1]ᵀ, u2ᵀ)). With `rng`, the factors carry this block's dropout masks exactly as
        `apply(..., rng=rng)` draws them."""
        self._check(adapter)
        self._depth_of(adapter, depth)
        u1, v1, c1, u2, v2, c2 = (jnp.asarray(adapter[n]) for n in LEAVES)
        drop = self.dropout if rng is not None else 0.0
        out = {}
        for i in range(depth):
            a1 = c1 if self.variant == "shared" else c1[:, :, 4 * i:4 * i + 4]
            a2 = c2 if self.variant == "shared" else c2[:, :, 2 * i:2 * i + 2]
            if drop:
                ks = jax.random.split(jax.random.fold_in(rng, i), 9)
                du1, da1, dv1 = (lr.dropout(kk, x, drop) for kk, x in zip(ks[:3], (u1, a1, v1)))
                f1 = [lr.dropout(kk, x, drop) for kk, x in zip(ks[3:6], (u2, a2[:, :, 0], v2))]
                f2 = [lr.dropout(kk, x, drop) for kk, x in zip(ks[6:9], (u2, a2[:, :, 1], v2))]
            else:
                du1, da1, dv1 = u1, a1, v1
                f1 = [u2, a2[:, :, 0], v2]
                f2 = [u2, a2[:, :, 1], v2]
            block = {m: (du1, da1[:, :, j], dv1) for j, m in enumerate(ATTN)}
            block["fc1"] = tuple(f1)
            block["fc2"] = (f2[2].T, f2[1].T, f2[0].T)
            out[i] = block
        return out

    def edits(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict[str, LowRank]:
        """One LowRank per adapted matrix with the (dropped, when `rng` is given) factors of `factors`;
        no activation dropout (EFFT's noise is on the factor entries)."""
        blocks = lr.blocks_of(params)
        fac = self.factors(adapter, len(blocks), rng)
        return {blocks[i][m].name: LowRank(tuple(f), scale=float(self.scale))
                for i in range(len(blocks)) for m, f in fac[i].items()}


    def from_official(self, state_dict: Mapping[str, Any], params: Tree | None) -> dict:
        d, m, depth = self._shapes(lr.need_params(params, self.name))
        r = self.rank
        n1, n2 = self._slices(depth)
        sd = lr.official_dict(state_dict, "EFFT", self.name)
        out = {"u1": sd.take("EFFTu1", (d, r)), "v1": sd.take("EFFTv1", (r, d)),
               "u2": sd.take("EFFTu2", (d, r)), "v2": sd.take("EFFTv2", (r, m))}
        if self.variant == "shared":
            out["c1"], out["c2"] = sd.take("EFFTc1", (r, r, 4)), sd.take("EFFTc2", (r, r, 2))
        else:
            for name, n in (("c1", n1), ("c2", n2)):
                x = sd.take(f"EFFT{name}", min_shape=(r, r, n))
                if x is not None and x.shape[:2] != (r, r):
                    sd.bad_shape.append(f"EFFT{name}: got {x.shape}, expected ({r}, {r}, >= {n})")
                out[name] = None if x is None else x[:, :, :n]
        sd.finish(lambda k: "EFFT" in k,
                  "Pass the rank used in training (EFFTu1 is (width, rank)) and variant='shared' for the "
                  "released code (cores with 4 and 2 slices).")
        return {n: jnp.asarray(out[n]) for n in LEAVES}

    def to_official(self, tree: Tree) -> dict[str, np.ndarray]:
        self._check(tree)
        out = {}
        for n in LEAVES:
            x = np.asarray(jax.device_get(tree[n]))
            out[_OFFICIAL[n]] = x if x.dtype == np.float64 else x.astype(np.float32)
        return out

    def summary(self) -> str:
        where = ("one increment shared by all blocks (released code)" if self.variant == "shared"
                 else "per-block core slices, shared u/v")
        return (f"efft: EFFT rank {self.rank}, ΔK = {self.scale}·u c_j v on q, k, v, o (u1, c1, v1) and fc1, fc2 "
                f"(u2, c2, v2; fc2 transposed), {where}; init {self.init_scheme!r} (zero "
                f"{self.init_scheme[0]}1, {self.init_scheme[1]}2 at init); "
                f"training dropout {self.dropout} on the factor entries")
