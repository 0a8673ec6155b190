"""The Swin variants of RLRR, EFFT and FacT, over the Swin's sites (`jax_peft.swin.swin_sites`).

`get_method("rlrr" | "efft" | "fact_tt" | "fact_tk")` runs these on a Swin tree (`BackboneVariants`);
their own names ("rlrr_swin", "efft_swin", "fact_tt_swin", "fact_tk_swin") remain as aliases.

RLRR on Swin ("rlrr_swin"; zstarN70/RLRR `models/swin.py`). Rescaled linears, each
`K ⊙ (1 + s_in s_outᵀ)` and bias + f: the FUSED qkv (so q, k and v share one input-side scale
s_in), proj, fc1, fc2 of every block and every patch-merging reduction. The reduction has no bias
of its own: its bias is f alone, so `apply` / `merge` give the tree a `layers_i/downsample/reduction/
bias` leaf (which the Swin model uses; timm's SwinTransformer has no such parameter). SSF (γ, β)
after norm1 and norm2 of every block and after the final norm; the patch embedding, the merging
norms and the bias tables are not adapted. Init as on the ViT (kaiming-uniform scales, f = 0, SSF
N(1, .02²) / N(0, .02²)). Adapter leaves mirror the tree: `<linear node>/{s_in, s_out, f}` and
`<norm node>/{ssf_scale, ssf_shift}`. Swin-B count (no head) 358,144.

EFFT on Swin ("efft_swin"; Dongping-Chen/EFFT-EFfective-Factor-Tuning `methods/Set_EFFT.py`). Per
stage i, factors shared by every block of the stage (adapter `layers_i/efft/...`, official
`EFFT_{i+1}_...`, same layouts):

    attn_u (D_i, r_i), attn_c (4, r_i, r_i), attn_v (r_i, D_i):   ΔQ|ΔK|ΔV|ΔO = u c[j] v
    mlp_u (D_i, a_i), mlp_c (L_i, a_i, b_i), mlp_v (b_i, 4 D_i):    Δfc1 = u c[0] v, Δfc2 = (u c[1] v)ᵀ

each added with scale s to qkv (columns q | k | v), proj, fc1 and fc2 of every block of the stage.
Only c[0] and c[1] of the MLP core are read (the other L_i - 2 slices are allocated and counted, as
released, and never get a gradient). Ranks double per stage from `rank` and `mlp_rank`: the released
Swin-B setter uses rank 4, mlp_rank (2, 4) (count 291,728); its Swin-S and Swin-L setters (4, (4, 8))
and (8, (8, 16)) give 378,112 and 1,512,448, and (4, (4, 8)) on Swin-B gives 497,792, the paper's
0.49M. Init: v = 0, u and c xavier-uniform. Training dropout (`dropout`, 0.1 officially) acts on
the factor entries when `apply` gets an `rng` (see `EFFTSwin.edits`); eval and merge have none.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jax_peft import paths
from jax_peft import sites as sites_lib
from jax_peft.methods import edits as edits_lib
from jax_peft.methods import lowrank as lr
from jax_peft.methods.base import (
    Method,
    check_adapter,
    check_number,
    check_positive_int,
    check_rate,
)
from jax_peft.methods.edits import LowRank, OutputAffine, Rescale
from jax_peft.methods.rlrr import RLRR, init_leaves
from jax_peft.sites import Site

Tree = Mapping[str, Any]
_RESCALED = ("qkv", "o", "fc1", "fc2", "merge")
_OFFICIAL_LEAF = {"s_in": "scale_col", "s_out": "scale_line", "f": "shift_bias"}


def _require_swin(params: Tree, method: str) -> dict[str, Site]:
    if not sites_lib._is_swin(params):
        raise ValueError(f"{method} is the Swin Transformer variant; for a ViT use "
                         f"get_method({method.removesuffix('_swin')!r})")
    return sites_lib.sites(params)


def torch_name(node: str) -> str:
    """'layers_0/blocks_1/attn/qkv' -> 'layers.0.blocks.1.attn.qkv'."""
    return re.sub(r"(layers|blocks)_(\d+)", r"\1.\2", node).replace("/", ".")


def _tree_node(name: str) -> str:
    """Inverse of `torch_name`."""
    return re.sub(r"(layers|blocks)\.(\d+)", r"\1_\2", name).replace(".", "/")


def with_merge_bias(params: Tree) -> dict:
    """`params` with a zero `bias` beside every patch-merging reduction that has none."""
    flat = dict(paths.flatten(params))
    for k, v in list(flat.items()):
        m = re.fullmatch(r"(layers_\d+/downsample/reduction)/kernel", k)
        if m and f"{m.group(1)}/bias" not in flat:
            flat[f"{m.group(1)}/bias"] = jnp.zeros(np.shape(v)[-1:], jnp.result_type(v))
    return paths.unflatten(flat)


@dataclasses.dataclass(frozen=True)
class RLRRSwin(Method):
    """RLRR's official Swin variant (module docstring). Hyper-parameter `init`: "official" or
    "identity" (s_out = 0, γ = 1, β = 0: the pretrained function at step 0)."""

    init_scheme: str = "official"

    name: ClassVar[str] = "rlrr_swin"
    head_init: ClassVar[str] = "zeros"
    hparam_aliases: ClassVar[Mapping[str, str]] = {"init": "init_scheme"}
    edit_kinds: ClassVar[tuple[type, ...]] = (Rescale, OutputAffine)

    def __post_init__(self):
        if self.init_scheme not in ("official", "identity"):
            raise ValueError(f"rlrr_swin: unknown init {self.init_scheme!r}; use 'official' or 'identity'")

    def select(self, params: Tree) -> list[Site]:
        """Rescaled linears (qkv, o, fc1, fc2, merge) and the SSF norms (ln1, ln2, final_norm)."""
        return [s for s in _require_swin(params, self.name).values()
                if s.kind in _RESCALED or s.name == "final_norm" or s.local in ("ln1", "ln2")]

    def init(self, rng: jax.Array, params: Tree) -> dict:
        return init_leaves(rng, self.select(params), self.init_scheme == "identity", _RESCALED)

    def edits(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict[str, Any]:
        by_node = {s.node: s for s in self.select(params)}
        out = {}
        for node, lv in paths.group_by_node(adapter).items():
            if node not in by_node:
                raise ValueError(f"rlrr_swin: the adapter has a location {node!r} that this Swin does not "
                                 "adapt; build the adapter with method.init for this model")
            s = by_node[node]
            out[s.name] = (Rescale(lv["s_in"], lv["s_out"], lv["f"]) if s.kind in _RESCALED
                           else OutputAffine(lv["ssf_scale"], lv["ssf_shift"]))
        return out

    # the official name rule, as on the ViT: no decay on the shifts f (`shift_bias`) and the norm SSF
    # (`ssf_*_norm1`, `ssf_*_encode_norm`), so `rlrr` and `rlrr_swin` train alike on a Swin
    decay_mask = RLRR.decay_mask

    def apply(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict:
        """The weight form; the merging reductions gain a bias (their shift f)."""
        check_adapter(self, params, adapter)
        params = with_merge_bias(params)
        return edits_lib.apply_edits(params, self.edits(params, adapter))

    def summary(self) -> str:
        return ("rlrr_swin: K ⊙ (1 + s_in s_outᵀ) and a bias shift on the fused qkv, proj, fc1, fc2 and every "
                "patch-merging reduction; SSF after norm1, norm2 and the final norm (Swin-B: 358,144). Folds "
                "exactly into the weights (the reductions gain a bias).")

    def from_official(self, state_dict: Mapping[str, Any], params: Tree | None = None) -> dict:
        """Adapter from the official names (`layers.0.blocks.0.attn.qkv.scale_col` (1, in),
        `scale_line` (out, 1), `shift_bias` (1, out), `layers.0.blocks.0.ssf_scale_norm1` (D,),
        `ssf_scale_encode_norm`); needs `params` (the Swin tree). Other tensors are ignored."""
        if params is None:
            raise ValueError("rlrr_swin: from_official needs params=the Swin parameter tree")
        sd = {re.sub(r"^module\.", "", k): v for k, v in state_dict.items()}
        problems, flat = [], {}
        for s in self.select(params):
            leaves = ("s_in", "s_out", "f") if s.kind in _RESCALED else ("ssf_scale", "ssf_shift")
            for leaf in leaves:
                name = official_rlrr_name(s, leaf)
                want = s.d_in if leaf == "s_in" else s.d_out
                if name not in sd:
                    problems.append(f"missing {name}")
                elif np.size(sd[name]) != want:
                    problems.append(f"{name} has {np.size(sd[name])} entries, expected {want}")
                else:
                    flat[f"{s.node}/{leaf}"] = jnp.asarray(np.asarray(sd[name]).reshape(-1),
                                                           jax.dtypes.canonicalize_dtype(np.float64))
        if problems:
            raise ValueError(f"rlrr_swin: the state dict does not match this Swin ({len(problems)} problem(s)): "
                             + "; ".join(problems[:12]) + (" ..." if len(problems) > 12 else ""))
        return paths.unflatten(flat)

    def to_official(self, tree: Tree) -> dict[str, np.ndarray]:
        """Flat {official name: array} of an adapter (or its gradient); a {"adapter", "head"} tree
        also gives `head.weight` (C, D) / `head.bias`."""
        adapter, out = _split_head(tree)
        for node, leaves in paths.group_by_node(adapter).items():
            for leaf, v in leaves.items():
                v = np.asarray(v)
                if leaf in _OFFICIAL_LEAF:
                    shape = (v.size, 1) if leaf == "s_out" else (1, v.size)
                    out[f"{torch_name(node)}.{_OFFICIAL_LEAF[leaf]}"] = v.reshape(shape)
                else:
                    out[_official_ssf(node, leaf)] = v
        return out


def _split_head(tree: Tree) -> tuple[Tree, dict[str, np.ndarray]]:
    """(adapter, {head.weight (C, D), head.bias}) of a {"adapter", "head"} tree; (tree, {}) otherwise."""
    if set(tree) != {"adapter", "head"}:
        return tree, {}
    return tree["adapter"], {"head.weight": np.asarray(tree["head"]["kernel"]).T,
                             "head.bias": np.asarray(tree["head"]["bias"])}


def _official_ssf(node: str, leaf: str) -> str:
    kind = leaf.split("_")[1]  # scale | shift
    if node == "norm":
        return f"ssf_{kind}_encode_norm"
    block, _, norm = torch_name(node).rpartition(".")
    return f"{block}.ssf_{kind}_{norm}"


def official_rlrr_name(site: Site, leaf: str) -> str:
    if leaf in _OFFICIAL_LEAF:
        return f"{torch_name(site.node)}.{_OFFICIAL_LEAF[leaf]}"
    return _official_ssf(site.node, leaf)


# ----------------------------------------------------------------------------------------- EFFT
@dataclasses.dataclass(frozen=True)
class EFFTSwin(Method):
    """EFFT's official Swin variant (module docstring): stage-shared factors, ranks doubling per
    stage from `rank` (attention) and `mlp_rank` (a, b); scale `scale`."""

    rank: int = 4
    mlp_rank: tuple[int, int] = (2, 4)
    scale: float = 1.0
    growth: int = 2
    dropout: float = 0.1

    name: ClassVar[str] = "efft_swin"
    head_init: ClassVar[str] = "torch_linear"
    edit_kinds: ClassVar[tuple[type, ...]] = (LowRank,)

    def __post_init__(self):
        check_positive_int(self.rank, "rank", self.name)
        check_positive_int(self.growth, "growth", self.name)
        mlp = tuple(int(x) for x in self.mlp_rank)
        if len(mlp) != 2 or min(mlp) < 1:
            raise ValueError(f"efft_swin: mlp_rank must be two positive ranks (a, b), got {self.mlp_rank!r}")
        object.__setattr__(self, "mlp_rank", mlp)
        check_number(self.scale, "scale", self.name)
        check_rate(self.dropout, "dropout", self.name)

    def _stages(self, params: Tree) -> dict[int, list[Site]]:
        out: dict[int, list[Site]] = {}
        for s in _require_swin(params, self.name).values():
            if s.block is not None and s.kind in ("qkv", "o", "fc1", "fc2"):
                out.setdefault(s.stage, []).append(s)
        return out

    def ranks(self, stage: int) -> tuple[int, int, int]:
        g = self.growth**stage
        return self.rank * g, self.mlp_rank[0] * g, self.mlp_rank[1] * g

    def init(self, rng: jax.Array, params: Tree) -> dict:
        flat = {}
        for i, sts in self._stages(params).items():
            d = sts[0].d_in
            m = next(s.d_out for s in sts if s.kind == "fc1")
            depth = len({s.block for s in sts})
            if depth < 2:
                raise ValueError(f"efft_swin: stage {i} has {depth} block; the released code's MLP core has one "
                                 "slice per block of the stage and reads slices 0 and 1, so every stage needs >= 2 "
                                 "blocks (all released Swins have). Use a Swin with depths >= 2, or another method")
            r, a, b = self.ranks(i)
            k = jax.random.split(jax.random.fold_in(rng, i), 4)
            node = f"layers_{i}/efft"
            flat[f"{node}/attn_u"] = lr.xavier_uniform(k[0], (d, r))
            flat[f"{node}/attn_c"] = lr.xavier_uniform(k[1], (4, r, r))
            flat[f"{node}/attn_v"] = jnp.zeros((r, d), jnp.float32)
            flat[f"{node}/mlp_u"] = lr.xavier_uniform(k[2], (d, a))
            flat[f"{node}/mlp_c"] = lr.xavier_uniform(k[3], (depth, a, b))
            flat[f"{node}/mlp_v"] = jnp.zeros((b, m), jnp.float32)
        return paths.unflatten(flat)

    def edits(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict[str, Any]:
        """LowRank edits on qkv, o, fc1, fc2 of every block. With `rng` (training) the factor
        entries get the official dropout: per block one mask each for u, c[:4] and v shared by
        qkv and o, and fresh masks for fc1's (u, c[0], v) and fc2's (u, c[1], v); block g's masks
        come from `jax.random.fold_in(rng, g)`."""
        out = {}
        for i, sts in self._stages(params).items():
            f = adapter[f"layers_{i}"]["efft"]
            for g in sorted({s.block for s in sts}):
                if rng is None or self.dropout == 0.0:
                    drop = [lambda x: x] * 9
                else:
                    keys = jax.random.split(jax.random.fold_in(rng, g), 9)
                    drop = [lambda x, k=k: lr.dropout(k, x, self.dropout) for k in keys]
                u, c, v = drop[0](f["attn_u"]), drop[1](f["attn_c"][:4]), drop[2](f["attn_v"])
                fc1 = (drop[3](f["mlp_u"]), drop[4](f["mlp_c"][0]), drop[5](f["mlp_v"]))
                fc2 = (drop[6](f["mlp_u"]), drop[7](f["mlp_c"][1]), drop[8](f["mlp_v"]))
                for s in (s for s in sts if s.block == g):
                    if s.kind == "qkv":
                        qkv = jnp.concatenate([c[0] @ v, c[1] @ v, c[2] @ v], axis=1)
                        out[s.name] = LowRank((u, qkv), self.scale)
                    elif s.kind == "o":
                        out[s.name] = LowRank((u, c[3], v), self.scale)
                    elif s.kind == "fc1":
                        out[s.name] = LowRank(fc1, self.scale)
                    else:
                        out[s.name] = LowRank(tuple(x.T for x in reversed(fc2)), self.scale)
        return out

    def summary(self) -> str:
        return (f"efft_swin: per stage i, factors shared by its blocks, attention rank {self.rank}·{self.growth}^i "
                f"and MLP ranks {self.mlp_rank}·{self.growth}^i, scale {self.scale} (released Swin-B: 291,728).")

    def from_official(self, state_dict: Mapping[str, Any], params: Tree | None = None) -> dict:
        """Adapter from `EFFT_{i+1}_{attn,mlp}_{u,c,v}` (same layouts); needs `params`."""
        if params is None:
            raise ValueError("efft_swin: from_official needs params=the Swin parameter tree")
        sd = {re.sub(r"^module\.", "", k): v for k, v in state_dict.items()}
        want = paths.flatten(jax.eval_shape(lambda p: self.init(jax.random.PRNGKey(0), p), params))
        problems, flat = [], {}
        for path, spec in want.items():
            name = _efft_official(path)
            if name not in sd:
                problems.append(f"missing {name}")
            elif tuple(np.shape(sd[name])) != tuple(spec.shape):
                problems.append(f"{name} has shape {np.shape(sd[name])}, expected {tuple(spec.shape)}")
            else:
                flat[path] = jnp.asarray(sd[name], jax.dtypes.canonicalize_dtype(np.float64))
        if problems:
            raise ValueError("efft_swin: the state dict does not match these ranks and this Swin: "
                             + "; ".join(problems[:12]) + ". Check rank, mlp_rank and growth.")
        return paths.unflatten(flat)

    def to_official(self, tree: Tree) -> dict[str, np.ndarray]:
        adapter, out = _split_head(tree)
        for path, v in paths.flatten(adapter).items():
            out[_efft_official(path)] = np.asarray(v)
        return out


def _efft_official(path: str) -> str:
    """'layers_0/efft/attn_u' -> 'EFFT_1_attn_u'."""
    m = re.fullmatch(r"layers_(\d+)/efft/((?:attn|mlp)_[ucv])", path)
    if not m:
        raise ValueError(f"{path!r} is not an efft_swin adapter leaf (layers_i/efft/{{attn,mlp}}_{{u,c,v}})")
    return f"EFFT_{int(m.group(1)) + 1}_{m.group(2)}"


# ------------------------------------------------------------------------------------------ FacT
@dataclasses.dataclass(frozen=True)
class _FacTSwin(Method):
    """FacT on a Swin as the FacT paper describes it (no Swin code was released): each stage i is
    tensorized on its own, with a pair U_i (D_i, r), V_i (r, D_i) (adapter `layers_i/fact/{U, V}`)
    and per block (r, r) cores T_q, T_k, T_v, T_o, T1 (r, 4r), T2 (4r, r); increments as FacT on the
    ViT (`jax_peft.methods.fact`): qkv += s·U [T_q | T_k | T_v] V (V per rank-r chunk), proj +=
    s·U T_o V, fc1 += s·U T1 kron(I_4, V), fc2 += s·kron(I_4, U) T2 V. Init as FacT's: U PyTorch-Linear
    uniform, V = 0. `dropout` acts on the rank-r activation in the activation form (training), as
    FacT's on the ViT; the weight form (eval, merge) has none."""

    rank: int = 16
    scale: float = 1.0
    dropout: float = 0.1

    head_init: ClassVar[str] = "torch_linear"
    edit_kinds: ClassVar[tuple[type, ...]] = (LowRank,)

    def __post_init__(self):
        check_positive_int(self.rank, "rank", self.name)
        check_number(self.scale, "scale", self.name)
        check_rate(self.dropout, "dropout", self.name)

    def _blocks(self, params: Tree) -> dict[tuple[int, int], dict[str, Site]]:
        """{(stage, block in stage): {"qkv" | "o" | "fc1" | "fc2": Site}}."""
        out: dict[tuple[int, int], dict[str, Site]] = {}
        for s in _require_swin(params, self.name).values():
            if s.block is not None and s.kind in ("qkv", "o", "fc1", "fc2"):
                j = int(re.search(r"block(\d+)/", s.name).group(1))
                out.setdefault((s.stage, j), {})[s.kind] = s
        return out

    def _stage_shapes(self, params: Tree) -> dict[int, tuple[int, int, int]]:
        """{stage: (D_i, MLP ratio k, blocks L_i)}."""
        out: dict[int, tuple[int, int, int]] = {}
        for (i, _), st in self._blocks(params).items():
            d, m = st["qkv"].d_in, st["fc1"].d_out
            if m % d:
                raise ValueError(f"{self.name}: the MLP width {m} is not a multiple of the width {d}")
            lr.check_rank_width(self.rank, d, self.name)
            out[i] = (d, m // d, out.get(i, (0, 0, 0))[2] + 1)
        return out

    def _pair(self, rng: jax.Array, stage: int, d: int) -> dict[str, jax.Array]:
        ku = jax.random.fold_in(rng, 1000 + stage)
        return {f"layers_{stage}/fact/U": lr.torch_linear_uniform(ku, (d, self.rank), d),
                f"layers_{stage}/fact/V": jnp.zeros((self.rank, d), jnp.float32)}

    def cores(self, params: Tree, adapter: Tree) -> dict[tuple[int, int], dict[str, jax.Array]]:
        """{(stage, block in stage): {"q", "k", "v", "o": (r, r), "fc1": (r, k·r), "fc2": (k·r, r)}}."""
        raise NotImplementedError

    def edits(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict[str, Any]:
        opts = {"scale": float(self.scale), "dropout": float(self.dropout), "dropout_after": 1}
        blocks, out = self._blocks(params), {}
        for (i, j), t in self.cores(params, adapter).items():
            st = blocks[(i, j)]
            u, v = adapter[f"layers_{i}"]["fact"]["U"], adapter[f"layers_{i}"]["fact"]["V"]
            out[st["qkv"].name] = LowRank((u, jnp.concatenate([t["q"], t["k"], t["v"]], axis=1), v), **opts)
            for m in ("o", "fc1", "fc2"):
                out[st[m].name] = LowRank((u, t[m], v), **opts)
        return out


@dataclasses.dataclass(frozen=True)
class FacTTTSwin(_FacTSwin):
    """FacT-TT on a Swin (`_FacTSwin`): every block its own cores (`layers_i/blocks_j/fact/{q, k, v,
    o, fc1, fc2}`, PyTorch-Linear uniform). Count 2r·ΣD_i + 12r²·L (Swin-B, r = 16: 135,168, the
    paper's 0.135M)."""

    name: ClassVar[str] = "fact_tt_swin"

    def init(self, rng: jax.Array, params: Tree) -> dict:
        r, flat = self.rank, {}
        shapes = self._stage_shapes(params)
        for (i, j), st in self._blocks(params).items():
            d, k, _ = shapes[i]
            if j == 0:
                flat.update(self._pair(rng, i, d))
            keys = jax.random.split(jax.random.fold_in(rng, st["qkv"].block), 6)
            node = f"layers_{i}/blocks_{j}/fact"
            for key, mod in zip(keys, ("q", "k", "v", "o")):
                flat[f"{node}/{mod}"] = lr.torch_linear_uniform(key, (r, r), r)
            flat[f"{node}/fc1"] = lr.torch_linear_uniform(keys[4], (r, k * r), r)
            flat[f"{node}/fc2"] = lr.torch_linear_uniform(keys[5], (k * r, r), k * r)
        return paths.unflatten(flat)

    def cores(self, params: Tree, adapter: Tree) -> dict[tuple[int, int], dict[str, jax.Array]]:
        return {(i, j): adapter[f"layers_{i}"][f"blocks_{j}"]["fact"] for i, j in self._blocks(params)}

    def summary(self) -> str:
        return (f"fact_tt_swin: FacT-TT per stage (the paper's Swin reading, no released code), rank {self.rank}, "
                f"scale {self.scale}: U_i, V_i per stage, one set of cores per block (Swin-B r=16: 135,168).")


@dataclasses.dataclass(frozen=True)
class FacTTKSwin(_FacTSwin):
    """FacT-TK on a Swin (`_FacTSwin`): per stage i a core C_i (r, r, r) and a mixing matrix P_i
    (r, L_i·(4 + 2k)) (`layers_i/fact/{C, P}`, xavier-uniform); block ℓ's slices A_ℓ = C_i ×₃ P_i[:, ℓ]
    (r, r, 4 + 2k) give T_q, T_k, T_v, T_o = A_ℓ[:, :, 0..3] and, per MLP chunk c, T1's c-th column
    block A_ℓ[:, :, 4 + c] and T2's c-th row block A_ℓ[:, :, 4 + k + c] (the clean per-slice layout,
    `fact_tk`'s mlp_layout="paper"). Count Σ_i 2r·D_i + r³ + r·L_i·(4 + 2k) (Swin-B, r = 16: 82,432)."""

    name: ClassVar[str] = "fact_tk_swin"

    def init(self, rng: jax.Array, params: Tree) -> dict:
        r, flat = self.rank, {}
        for i, (d, k, depth) in self._stage_shapes(params).items():
            flat.update(self._pair(rng, i, d))
            kc, kp = jax.random.split(jax.random.fold_in(rng, i))
            flat[f"layers_{i}/fact/C"] = lr.xavier_uniform(kc, (r, r, r))
            flat[f"layers_{i}/fact/P"] = lr.xavier_uniform(kp, (r, depth * (4 + 2 * k)))
        return paths.unflatten(flat)

    def cores(self, params: Tree, adapter: Tree) -> dict[tuple[int, int], dict[str, jax.Array]]:
        r, out = self.rank, {}
        shapes = self._stage_shapes(params)
        for i, j in self._blocks(params):
            _, k, depth = shapes[i]
            f = adapter[f"layers_{i}"]["fact"]
            p = f["P"].reshape(r, depth, 4 + 2 * k)[:, j]
            a = jnp.einsum("abc,cd->abd", f["C"], p, precision=jax.lax.Precision.HIGHEST)
            out[(i, j)] = {**{m: a[:, :, n] for n, m in enumerate(("q", "k", "v", "o"))},
                           "fc1": a[:, :, 4:4 + k].transpose(0, 2, 1).reshape(r, k * r),
                           "fc2": a[:, :, 4 + k:].transpose(2, 0, 1).reshape(k * r, r)}
        return out

    def summary(self) -> str:
        return (f"fact_tk_swin: FacT-TK per stage (the paper's Swin reading, no released code), rank {self.rank}, "
                f"scale {self.scale}: U_i, V_i, core C_i and mixing P_i per stage (Swin-B r=16: 82,432).")
