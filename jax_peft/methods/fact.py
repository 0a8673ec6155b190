"""FacT (Jie & Deng, AAAI 2023): factor-tuning with tensorized increments, TT and TK formats.

Both formats share two width-sized factors across all blocks, U (D, r) and V (r, D), and give each
adapted (D, D) matrix of block ℓ the increment `ΔK = s · U T V` with a small r×r core T (Flax kernel
layout, `y = x K + b`). The MLP kernels fc1 (D, M) and fc2 (M, D) are treated as k = M/D square
blocks each (k = 4 for every standard ViT): column block i of ΔK_fc1 and row block i of ΔK_fc2.

FacT-TT (`FacTTT`): every block has its own cores
    q, k, v, o: (L, r, r)      T_x
    fc1:        (L, r, k·r)    column block i of ΔK_fc1 = s · U fc1[ℓ][:, i r:(i+1) r] V
    fc2:        (L, k·r, r)    row block i of ΔK_fc2    = s · U fc2[ℓ][i r:(i+1) r, :] V
    count 2Dr + 12Lr² (ViT-B/16: 1536r + 144r²; r=4 8,448, r=8 21,504, r=16 61,440)

FacT-TK (`FacTTK`): one core C (r, r, r) and a mixing matrix P (r, L·c) with c columns per block
(c = 4 + 2k = 12 for blocks="all"); block ℓ's slices are `A = C ×₃ P[:, cℓ:cℓ+c]` (r, r, c):
    attention ΔK_{q,k,v,o} = s · U A[:, :, j] V, j = 0..3
    MLP slices M = A[:, :, 4:4+2k], combined according to `mlp_layout`:
      "official" (default, the released code): F1 = M[:, :, :k].reshape(r, k r), F2 = M[:, :, k:].reshape(r, k r)
          in C order (this mixes the core slices: F[a, k b + j] = M[a, b, j]); fc1 column block i is
          s · U F1[:, i r:(i+1) r] V and fc2 row block i is s · U (F2[:, i r:(i+1) r])ᵀ V.
      "paper" (the paper's clean per-slice reading): fc1 column block i = s · U M[:, :, i] V,
          fc2 row block i = s · U M[:, :, k+i] V. Different logits from the official code.
    count 2Dr + cLr + r³ (ViT-B/16: 1680r + r³; r=8 13,952, r=32 86,528)

`blocks` chooses the adapted matrices: "all" (q, k, v, o, fc1, fc2; the official method), "mhsa"
(q, k, v, o only) or "ffn" (fc1, fc2 only). For TK it also sets c (4 + 2k, 4 or 2k).

Official initializations (PyTorch defaults of the released code): U ~ U(±1/√D) (nn.Linear default),
V = 0 (so the model starts at the pretrained function); TT cores nn.Linear defaults: q, k, v, o and
fc1 U(±1/√r), fc2 U(±1/√(k r)) (= ±1/(2√r)); TK C and P xavier-uniform with PyTorch's fans
(C: ±√3/r; P (r, L·c): ±√(6/(L·c + r)), which is the official ±√(6/(144 + r)) for ViT-B).

`dropout` (0.1 officially) is the rate of the training-time Dropout on the rank-r activation after
the core (activation form); the weight form `apply` is exact in eval mode and has no noise, so the
value is only stored here for the trainer.

Official layouts (`from_official` / `to_official`, PyTorch names of the released code, D = 768):
`FacTu.weight` (r, D) = Uᵀ, `FacTv.weight` (D, r) = Vᵀ; TT `blocks.{ℓ}.attn.{q,k,v,proj}_FacTs.weight`
(r, r) = T_xᵀ, `blocks.{ℓ}.mlp.fc1_FacTs.weight` (k r, r) = fc1ᵀ, `blocks.{ℓ}.mlp.fc2_FacTs.weight`
(r, k r) = fc2ᵀ; TK `FacTc` (r, r, r) = C, `FacTp` (r, 144) with block ℓ in columns 12ℓ…12ℓ+11.
The official P always has 144 columns (12 blocks) whatever the depth: importing into a depth-L model
uses the first 12L columns (the rest are unused by the official forward too, so they are ignored) and
fails if there are fewer; exporting pads with zero columns up to 12 blocks (144) when L < 12 and
exports 12L columns otherwise. With blocks="mhsa"/"ffn" the other columns of each block are exported
as zeros, and importing refuses an official P whose discarded columns are non-zero (that would
silently change the model). `to_official` reads the depth from P's
column count assuming the official MLP ratio k = 4 (12 columns per block), the only ratio the
official layout exists for.
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
MLP = ("fc1", "fc2")
_OFFICIAL_ATTN = {"q": "q", "k": "k", "v": "v", "o": "proj"}
_BLOCKS = ("all", "mhsa", "ffn")
_LAYOUTS = ("official", "paper")
_OFFICIAL_RATIO = 4  # the official code hard-codes MLP ratio 4 (and width 768, depth 12)
_OFFICIAL_DEPTH = 12


def _dense(x: Any) -> np.ndarray:
    """Numpy copy for export: float64 stays float64, everything else becomes float32."""
    x = np.asarray(jax.device_get(x))
    return x if x.dtype == np.float64 else x.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _FacT(BackboneVariants, Method):
    """Hyper-parameters shared by both FacT formats."""

    rank: int = 8
    scale: float = 1.0
    dropout: float = 0.1
    blocks: str = "all"

    head_init: ClassVar[str] = "torch_linear"

    edit_kinds: ClassVar[tuple[type, ...]] = (LowRank,)

    def __post_init__(self) -> None:
        check_positive_int(self.rank, "rank", self.name)
        check_rate(self.dropout, "dropout", self.name)
        check_choice(self.blocks, _BLOCKS, "blocks", self.name)
        check_number(self.scale, "scale", self.name)

    @property
    def modules(self) -> tuple[str, ...]:
        return {"all": ATTN + MLP, "mhsa": ATTN, "ffn": MLP}[self.blocks]

    def _shapes(self, params: Tree) -> tuple[int, int, int]:
        """(D, k, L) of `params`, validated against the rank."""
        d, m, depth = lr.width_mlp_depth(params)
        lr.check_rank_width(self.rank, d, self.name)
        k = lr.mlp_ratio(d, m, self.name) if self.blocks != "mhsa" else 0  # k unused without MLP
        return d, k, depth

    def _check_keys(self, adapter: Tree, expected: tuple[str, ...]) -> None:
        got = set(adapter)
        if got != set(expected):
            raise ValueError(f"{self.name} (blocks={self.blocks!r}) expects adapter leaves {sorted(expected)}, "
                             f"got {sorted(got)}; build the adapter with the same method settings")

    def adapter_hint(self) -> str:
        return (f"Its leaves depend on blocks={self.blocks!r} (which matrices are adapted), the rank and, for the "
                "cores / P, the depth and MLP ratio. ")

    def cores(self, params: Tree, adapter: Tree) -> dict[int, dict[str, jax.Array]]:
        """{block: {module: core}} with attention cores (r, r), fc1 T1 (r, k·r), fc2 T2 (k·r, r)."""
        raise NotImplementedError

    def edits(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict[str, LowRank]:
        """Per block: one LowRank (U, [T_q | T_k | T_v], V) on the fused qkv site (V acts on each rank-r
        chunk), (U, T_o, V) on o, (U, T1, V) on fc1 (V chunk-wise: the k square blocks) and (U, T2, V) on
        fc2 (U chunk-wise); dropout on the rank-r activation after the core, as the official code."""
        opts = dict(scale=float(self.scale), dropout=float(self.dropout), dropout_after=1)
        u, v = adapter["U"], adapter["V"]
        blocks = lr.blocks_of(params)
        out = {}
        for i, cores in self.cores(params, adapter).items():
            site = blocks[i]
            if "q" in cores:
                qkv = jnp.concatenate([cores[m] for m in ("q", "k", "v")], axis=1)
                out[site["qkv"].name] = LowRank((u, qkv, v), **opts)
                out[site["o"].name] = LowRank((u, cores["o"], v), **opts)
            for m in MLP:
                if m in cores:
                    out[site[m].name] = LowRank((u, cores[m], v), **opts)
        return out

    @staticmethod
    def _is_adapter_name(name: str) -> bool:
        return "FacT" in name


@dataclasses.dataclass(frozen=True)
class FacTTT(_FacT):
    """FacT-TT: shared U, V and per-block cores (see the module docstring for the exact math)."""

    name: ClassVar[str] = "fact_tt"
    variants: ClassVar[Mapping[str, str]] = {"swin": "fact_tt_swin"}  # the paper's per-stage reading

    def init(self, rng: jax.Array, params: Tree) -> dict:
        d, k, depth = self._shapes(params)
        r = self.rank
        keys = jax.random.split(rng, 2 + len(self.modules))
        adapter = {"U": lr.torch_linear_uniform(keys[0], (d, r), d), "V": jnp.zeros((r, d), jnp.float32)}
        for key, m in zip(keys[2:], self.modules):
            if m in ATTN:
                adapter[m] = lr.torch_linear_uniform(key, (depth, r, r), r)
            elif m == "fc1":  # nn.Linear(r, k r): fan_in r
                adapter[m] = lr.torch_linear_uniform(key, (depth, r, k * r), r)
            else:  # nn.Linear(k r, r): fan_in k r
                adapter[m] = lr.torch_linear_uniform(key, (depth, k * r, r), k * r)
        return adapter

    def cores(self, params: Tree, adapter: Tree) -> dict[int, dict[str, jax.Array]]:
        depth = adapter[self.modules[0]].shape[0]
        return {i: {m: adapter[m][i] for m in self.modules} for i in range(depth)}


    def from_official(self, state_dict: Mapping[str, Any], params: Tree | None) -> dict:
        d, k, depth = self._shapes(lr.need_params(params, self.name))
        r = self.rank
        sd = lr.official_dict(state_dict, "FacT", self.name)
        u, v = sd.take("FacTu.weight", (r, d)), sd.take("FacTv.weight", (d, r))
        cores: dict[str, list] = {m: [] for m in self.modules}
        for i in range(depth):
            for m in self.modules:
                if m in ATTN:
                    name, shape = f"blocks.{i}.attn.{_OFFICIAL_ATTN[m]}_FacTs.weight", (r, r)
                elif m == "fc1":
                    name, shape = f"blocks.{i}.mlp.fc1_FacTs.weight", (k * r, r)
                else:
                    name, shape = f"blocks.{i}.mlp.fc2_FacTs.weight", (r, k * r)
                cores[m].append(sd.take(name, shape))
        sd.finish(self._is_adapter_name,
                  "Pass the rank used in training (FacTu.weight is (rank, width)), a params tree of the same "
                  "depth, and blocks='all' for adapters trained with the official code.")
        adapter = {"U": jnp.asarray(u.T), "V": jnp.asarray(v.T)}
        for m in self.modules:
            adapter[m] = jnp.asarray(np.stack([c.T for c in cores[m]]))
        return adapter

    def to_official(self, tree: Tree) -> dict[str, np.ndarray]:
        self._check_keys(tree, ("U", "V") + self.modules)
        out = {"FacTu.weight": _dense(tree["U"]).T, "FacTv.weight": _dense(tree["V"]).T}
        for m in self.modules:
            stacked = _dense(tree[m])
            for i in range(stacked.shape[0]):
                if m in ATTN:
                    name = f"blocks.{i}.attn.{_OFFICIAL_ATTN[m]}_FacTs.weight"
                else:
                    name = f"blocks.{i}.mlp.{m}_FacTs.weight"
                out[name] = np.ascontiguousarray(stacked[i].T)
        return out

    def summary(self) -> str:
        return (f"fact_tt: FacT-TT, ΔK = {self.scale}·U T V on {', '.join(self.modules)} of every block "
                f"(U (D, {self.rank}) and V ({self.rank}, D) shared, one {self.rank}x{self.rank} core per "
                f"matrix and MLP square block; V starts at 0); training dropout {self.dropout} on the "
                f"rank-{self.rank} activation (activation form only)")



@dataclasses.dataclass(frozen=True)
class FacTTK(_FacT):
    """FacT-TK: shared U, V, one core C (r, r, r) and a mixing matrix P (r, L·c); `mlp_layout`
    "official" (C-order reshape of the MLP slices, as released) or "paper" (clean per-slice)."""

    name: ClassVar[str] = "fact_tk"
    variants: ClassVar[Mapping[str, str]] = {"swin": "fact_tk_swin"}  # the paper's per-stage reading
    mlp_layout: str = "official"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.mlp_layout, _LAYOUTS, "mlp_layout", self.name)

    def columns(self, k: int) -> int:
        """Columns of P per block for MLP ratio k."""
        return {"all": 4 + 2 * k, "mhsa": 4, "ffn": 2 * k}[self.blocks]

    def init(self, rng: jax.Array, params: Tree) -> dict:
        d, k, depth = self._shapes(params)
        r = self.rank
        ku, kc, kp = jax.random.split(rng, 3)
        return {
            "U": lr.torch_linear_uniform(ku, (d, r), d),
            "V": jnp.zeros((r, d), jnp.float32),
            "C": lr.xavier_uniform(kc, (r, r, r)),
            "P": lr.xavier_uniform(kp, (r, depth * self.columns(k))),
        }

    def cores(self, params: Tree, adapter: Tree) -> dict[int, dict[str, jax.Array]]:
        """Slices A_ℓ = C ×₃ P_ℓ (r, r, c): attention j = A_ℓ[:, :, j]; MLP F1 / T2 by `mlp_layout`."""
        _, k, depth = self._shapes(params)
        r, c = self.rank, self.columns(k)
        p = adapter["P"]
        slices = jnp.einsum("abc,cld->labd", adapter["C"], p.reshape(r, depth, c), precision=jax.lax.Precision.HIGHEST)
        out = {}
        for i in range(depth):
            a, cores, off = slices[i], {}, 0
            if "q" in self.modules:
                cores.update({m: a[:, :, j] for j, m in enumerate(ATTN)})
                off = 4
            if "fc1" in self.modules:
                mlp = a[:, :, off:off + 2 * k]
                if self.mlp_layout == "official":
                    cores["fc1"] = mlp[:, :, :k].reshape(r, k * r)
                    cores["fc2"] = mlp[:, :, k:].reshape(r, k * r).T
                else:
                    cores["fc1"] = mlp[:, :, :k].transpose(0, 2, 1).reshape(r, k * r)
                    cores["fc2"] = mlp[:, :, k:].transpose(2, 0, 1).reshape(k * r, r)
            out[i] = cores
        return out


    def from_official(self, state_dict: Mapping[str, Any], params: Tree | None) -> dict:
        d, m, depth = lr.width_mlp_depth(lr.need_params(params, self.name))
        lr.check_rank_width(self.rank, d, self.name)
        k = lr.mlp_ratio(d, m, self.name)
        r, c_all = self.rank, 4 + 2 * k
        sd = lr.official_dict(state_dict, "FacT", self.name)
        u, v = sd.take("FacTu.weight", (r, d)), sd.take("FacTv.weight", (d, r))
        core = sd.take("FacTc", (r, r, r))
        p = sd.take("FacTp", min_shape=(r, c_all * depth))
        if p is not None and p.shape[0] != r:
            sd.bad_shape.append(f"FacTp: got {p.shape}, expected ({r}, >= {c_all * depth})")
        sd.finish(self._is_adapter_name,
                  f"Pass the rank used in training (FacTu.weight is (rank, width)); FacTp needs at least "
                  f"{c_all} columns per block ({c_all * depth} for depth {depth}).")
        full = p[:, : c_all * depth].reshape(r, depth, c_all)
        keep = {"all": slice(0, c_all), "mhsa": slice(0, 4), "ffn": slice(4, c_all)}[self.blocks]
        dropped = np.ones(c_all, bool)
        dropped[keep] = False
        if np.any(full[:, :, dropped] != 0):
            raise ValueError(f"fact_tk: the official FacTp has non-zero columns for matrices that blocks="
                             f"{self.blocks!r} does not adapt; importing would change the model. Use blocks='all'.")
        return {"U": jnp.asarray(u.T), "V": jnp.asarray(v.T), "C": jnp.asarray(core),
                "P": jnp.asarray(full[:, :, keep].reshape(r, -1))}

    def to_official(self, tree: Tree) -> dict[str, np.ndarray]:
        self._check_keys(tree, ("U", "V", "C", "P"))
        p = _dense(tree["P"])
        r, k = p.shape[0], _OFFICIAL_RATIO
        c = self.columns(k)
        if p.shape[1] % c:
            raise ValueError(f"fact_tk: P has {p.shape[1]} columns, not a multiple of the {c} columns per block "
                             f"of the official layout (MLP ratio 4, blocks={self.blocks!r})")
        depth = p.shape[1] // c
        c_all = 4 + 2 * k
        keep = {"all": slice(0, c_all), "mhsa": slice(0, 4), "ffn": slice(4, c_all)}[self.blocks]
        full = np.zeros((r, max(depth, _OFFICIAL_DEPTH), c_all), p.dtype)
        full[:, :depth, keep] = p.reshape(r, depth, -1)
        return {"FacTu.weight": _dense(tree["U"]).T, "FacTv.weight": _dense(tree["V"]).T,
                "FacTc": _dense(tree["C"]), "FacTp": full.reshape(r, -1)}

    def summary(self) -> str:
        return (f"fact_tk: FacT-TK, ΔK = {self.scale}·U (C ×₃ P_ℓ)[:, :, j] V on {', '.join(self.modules)} "
                f"of every block (U, V rank {self.rank} shared, core C ({self.rank},{self.rank},{self.rank}), "
                f"P with one column per adapted square matrix; MLP layout {self.mlp_layout!r}; V starts at 0); "
                f"training dropout {self.dropout} on the rank-{self.rank} activation (activation form only)")
