"""The spectral lens: how an adapter changes the singular value decomposition of each adapted matrix.

For every block and module (site kinds q, k, v, o, fc1, fc2 by default; matrix views (in, out) of the
backbone's sites, `jax_peft.sites`), with W the frozen matrix, W' the merged one and ΔW = W' − W:

- `s_base`, `s_adapted` (r,): singular values of W and W' (r = min(in, out), descending);
- `rel_change` (r,): (σ_i(W') − σ_i(W)) / σ_i(W), index by index;
- `delta_s` (r,): singular values of ΔW; `delta_fro` = ‖ΔW‖_F, `base_fro` = ‖W‖_F;
- `delta_rank`: numerical rank of ΔW, #{σ_i(ΔW) > tol} with tol = max(rtol·σ_1(ΔW), floor),
  rtol = max(in, out)·eps (NumPy's `matrix_rank` convention) and floor = eps·‖W'‖_F, a bound on
  the float32 rounding error of W' − W (so rounding noise is not counted as rank);
- `delta_erank`: effective rank of ΔW (Roy & Vetterli, 2007): exp(H(p)), p_i = σ_i / Σ_j σ_j over
  the singular values above the same tolerance, H the Shannon entropy (nats); 0 for ΔW = 0. It
  equals r for r equal singular values and is ≤ the numerical rank;
- `angles_left`, `angles_right` (k,): principal angles (radians, ascending) between the top-k left
  (input-space) and right (output-space) singular subspaces of W and W', and `overlap_left`,
  `overlap_right` = mean cos² of those angles = φ(W, W', k, k) (1: same top-k subspace).
  Angles are ill-defined when σ_k ≈ σ_{k+1} (the top-k subspace is then not unique). With k = 0
  no singular vectors are computed (about 3x cheaper); angles are then empty and overlaps NaN.

Everything is computed in float32 with `jnp.linalg.svd`, one jitted call per matrix shape, batched
over blocks and modules (q, k, v, o share one call; fc2 is transposed to fc1's shape and its sides
swapped back). Entry points: `spectral_lens(params, method, adapter)` (through `jax_peft.merge`,
so it works for every method) and `compare(base, adapted)` for two plain parameter trees (e.g. a
fully fine-tuned run, or merged `.npz` files).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_peft import paths
from jax_peft import sites as sites_lib
from jax_peft.analysis.similarity import numerical_rank, principal_angles

Array = jax.Array
Tree = Mapping[str, Any]
ALL_MODULES: tuple[str, ...] = ("q", "k", "v", "o", "fc1", "fc2")
EPS32 = float(np.finfo(np.float32).eps)


# --- functions on singular values -------------------------------------------------------------
def effective_rank(s: Array, tol: float | Array = 0.0) -> Array:
    """Roy & Vetterli effective rank exp(−Σ p_i log p_i), p_i = σ_i / Σσ, over the singular values
    `s` (..., r) strictly above `tol` (scalar or (...,)). Returns (...,); 0 where nothing is kept."""
    s = jnp.asarray(s, jnp.float32)
    kept = jnp.where(s > jnp.asarray(tol, s.dtype)[..., None], s, 0.0)
    total = jnp.sum(kept, axis=-1, keepdims=True)
    p = kept / jnp.where(total > 0, total, 1.0)
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return jnp.where(total[..., 0] > 0, jnp.exp(ent), 0.0)


def relative_change(s_base: Array, s_adapted: Array) -> Array:
    """(σ_i(W') − σ_i(W)) / σ_i(W), NaN where σ_i(W) = 0."""
    return jnp.where(s_base > 0, (s_adapted - s_base) / jnp.where(s_base > 0, s_base, 1.0), jnp.nan)


def rounding_floor(w_adapted: Array) -> Array:
    """eps(float32)·‖W'‖_F (...,): a bound on the spectral norm of the rounding error of a float32
    difference W' − W (each entry of W' is within a few half-ulps of its exact value)."""
    return EPS32 * jnp.sqrt(jnp.sum(jnp.square(w_adapted), axis=(-2, -1)))


def delta_tolerance(s_delta: Array, w_adapted: Array, rtol: float | None = None) -> Array:
    """The rank tolerance for ΔW used throughout: max(rtol·σ_1(ΔW), eps·‖W'‖_F) (...,)."""
    if rtol is None:
        rtol = max(w_adapted.shape[-2:]) * EPS32
    return jnp.maximum(rtol * s_delta[..., 0], rounding_floor(w_adapted))


# --- the batched kernel -----------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("k", "rtol"))
def matrix_spectra(w: Array, w_adapted: Array, k: int = 8, rtol: float | None = None) -> dict[str, Array]:
    """All statistics of the module docstring for matrices w, w_adapted (..., m, n), batched over
    the leading axes. Returns a dict of arrays with those leading axes."""
    w = jnp.asarray(w, jnp.float32)
    w2 = jnp.asarray(w_adapted, jnp.float32)
    if w.shape != w2.shape:
        raise ValueError(f"W and W' differ in shape: {w.shape} vs {w2.shape}")
    r = min(w.shape[-2:])
    if not 0 <= k <= r:
        raise ValueError(f"k={k} must be between 1 and min(in, out) = {r} (or 0: no subspace angles)")
    d = w2 - w
    sd = jnp.linalg.svd(d, compute_uv=False)
    tol = delta_tolerance(sd, w2, rtol)
    if k == 0:  # singular values only: about 3x cheaper than with vectors
        s = jnp.linalg.svd(w, compute_uv=False)
        s2 = jnp.linalg.svd(w2, compute_uv=False)
        a_left = a_right = jnp.zeros(s.shape[:-1] + (0,), s.dtype)
    else:
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        u2, s2, vt2 = jnp.linalg.svd(w2, full_matrices=False)
        a_left = principal_angles(u[..., :k], u2[..., :k])
        a_right = principal_angles(jnp.swapaxes(vt, -1, -2)[..., :k], jnp.swapaxes(vt2, -1, -2)[..., :k])
    return {
        "s_base": s,
        "s_adapted": s2,
        "rel_change": relative_change(s, s2),
        "delta_s": sd,
        "delta_fro": jnp.sqrt(jnp.sum(d * d, axis=(-2, -1))),
        "base_fro": jnp.sqrt(jnp.sum(w * w, axis=(-2, -1))),
        "delta_rank": numerical_rank(sd, rtol=0.0, atol=tol),
        "delta_erank": effective_rank(sd, tol),
        "delta_tol": tol,
        "angles_left": a_left,
        "angles_right": a_right,
        "overlap_left": jnp.mean(jnp.cos(a_left) ** 2, axis=-1),
        "overlap_right": jnp.mean(jnp.cos(a_right) ** 2, axis=-1),
    }


@functools.partial(jax.jit, static_argnames=("k", "rtol"))
def _unchanged_spectra(w: Array, k: int = 8, rtol: float | None = None) -> dict[str, Array]:
    """`matrix_spectra(w, w, k, rtol)` for W' = W exactly, from one values-only SVD."""
    w = jnp.asarray(w, jnp.float32)
    r = min(w.shape[-2:])
    if not 0 <= k <= r:
        raise ValueError(f"k={k} must be between 1 and min(in, out) = {r} (or 0: no subspace angles)")
    s = jnp.linalg.svd(w, compute_uv=False)
    batch = s.shape[:-1]
    zeros = jnp.zeros_like(s)
    angles = jnp.zeros(batch + (k,), s.dtype)
    overlap = jnp.ones(batch, s.dtype) if k else jnp.full(batch, jnp.nan, s.dtype)
    return {
        "s_base": s, "s_adapted": s, "rel_change": relative_change(s, s), "delta_s": zeros,
        "delta_fro": jnp.zeros(batch, s.dtype), "base_fro": jnp.sqrt(jnp.sum(w * w, axis=(-2, -1))),
        "delta_rank": jnp.zeros(batch, jnp.int32), "delta_erank": jnp.zeros(batch, s.dtype),
        "delta_tol": delta_tolerance(zeros, w, rtol), "angles_left": angles, "angles_right": angles,
        "overlap_left": overlap, "overlap_right": overlap,
    }


# --- trees ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModuleSpectra:
    """Statistics of one module over blocks; every array has the block axis first (numpy)."""

    module: str
    shape: tuple[int, int]  # (in, out) of the matrix view
    k: int
    blocks: tuple[int, ...]
    stats: Mapping[str, np.ndarray]

    def __getattr__(self, name: str) -> np.ndarray:
        stats = self.__dict__.get("stats", {})
        if name in stats:
            return stats[name]
        raise AttributeError(f"ModuleSpectra has no field {name!r}; statistics: {sorted(stats)}")

    def rows(self) -> list[dict[str, Any]]:
        """One summary dict per block (scalars only), for tables."""
        out = []
        for b, blk in enumerate(self.blocks):
            st = {n: v[b] for n, v in self.stats.items()}
            out.append({
                "module": self.module, "block": blk,
                "delta_fro": float(st["delta_fro"]),
                "delta_rel": float(st["delta_fro"] / st["base_fro"]) if st["base_fro"] > 0 else float("nan"),
                "delta_rank": int(st["delta_rank"]), "delta_erank": float(st["delta_erank"]),
                "max_abs_rel_change": float(np.nanmax(np.abs(st["rel_change"]))),
                "overlap_left": float(st["overlap_left"]), "overlap_right": float(st["overlap_right"]),
                "max_angle_left_deg": float(np.degrees(st["angles_left"][-1])) if self.k else float("nan"),
                "max_angle_right_deg": float(np.degrees(st["angles_right"][-1])) if self.k else float("nan"),
            })
        return out


def module_matrices(params: Tree, module: str, blocks: Sequence[int] | None = None) -> Array:
    """Matrix views (in, out) of the `module` sites (a site kind) stacked over blocks: (len(blocks), in, out)."""
    by_kind: dict[str, dict[int, sites_lib.Site]] = {}
    for s in sites_lib.sites(params).values():
        if s.block is not None and s.kernel is not None:
            by_kind.setdefault(s.kind, {})[s.block] = s
    if module not in by_kind:
        raise ValueError(f"unknown module {module!r}; choose from {', '.join(by_kind)}")
    blocks = sorted(by_kind[module]) if blocks is None else blocks
    mats = [sites_lib.matrix_view(jnp.asarray(paths.get(params, by_kind[module][i].kernel)), by_kind[module][i])
            for i in blocks]
    if not mats:
        raise ValueError("no blocks selected")
    return jnp.stack(mats)


def compare(base: Tree, adapted: Tree, *, k: int = 8, modules: Iterable[str] = ALL_MODULES,
            blocks: Sequence[int] | None = None, rtol: float | None = None) -> dict[str, ModuleSpectra]:
    """Spectral statistics of `adapted` (plain params, e.g. `merge(...)`) against `base`, per
    module over blocks. Returns {module: ModuleSpectra}."""
    modules = tuple(modules)
    depth = sites_lib.num_blocks(base)
    if sites_lib.num_blocks(adapted) != depth:
        raise ValueError(f"base has {depth} blocks but adapted has {sites_lib.num_blocks(adapted)}")
    blocks = tuple(range(depth)) if blocks is None else tuple(int(b) for b in blocks)
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(f"blocks {bad} do not exist in a {depth}-block model")
    # group modules by oriented shape (rows <= cols) so one jitted SVD call serves each group
    groups: dict[tuple[int, int], list[tuple[str, bool]]] = {}
    stacks: dict[str, tuple[Array, Array]] = {}
    for m in modules:
        w, w2 = module_matrices(base, m, blocks), module_matrices(adapted, m, blocks)
        if w.shape != w2.shape:
            raise ValueError(f"module {m}: base matrices {w.shape} vs adapted {w2.shape}")
        flip = w.shape[1] > w.shape[2]
        if flip:
            w, w2 = jnp.swapaxes(w, 1, 2), jnp.swapaxes(w2, 1, 2)
        stacks[m] = (w, w2)
        # bitwise-unchanged modules (e.g. k, o, fc1, fc2 under LoRA on q, v) skip two of three SVDs
        same = bool(jnp.array_equal(w, w2))
        groups.setdefault((*w.shape[1:], same), []).append((m, flip))
    out: dict[str, ModuleSpectra] = {}
    n = len(blocks)
    for (*shape, same), members in groups.items():
        w = jnp.concatenate([stacks[m][0] for m, _ in members])
        if same:
            stats = jax.device_get(_unchanged_spectra(w, k=k, rtol=rtol))
        else:
            w2 = jnp.concatenate([stacks[m][1] for m, _ in members])
            stats = jax.device_get(matrix_spectra(w, w2, k=k, rtol=rtol))
        for j, (m, flip) in enumerate(members):
            st = {name: np.asarray(v[j * n:(j + 1) * n]) for name, v in stats.items()}
            if flip:
                for a, b in (("angles_left", "angles_right"), ("overlap_left", "overlap_right")):
                    st[a], st[b] = st[b], st[a]
            io = shape[::-1] if flip else shape
            out[m] = ModuleSpectra(module=m, shape=(int(io[0]), int(io[1])), k=k, blocks=blocks, stats=st)
    return {m: out[m] for m in modules}


def spectral_lens(params: Tree, method: Any, adapter: Tree, *, k: int = 8,
                  modules: Iterable[str] = ALL_MODULES, blocks: Sequence[int] | None = None,
                  rtol: float | None = None) -> dict[str, ModuleSpectra]:
    """`compare(params, jax_peft.merge(params, method, adapter))`: the lens for any method."""
    from jax_peft.merge import merge

    return compare(params, merge(params, method, adapter), k=k, modules=modules, blocks=blocks, rtol=rtol)


def leaf_changes(base: Tree, adapted: Tree) -> dict[str, tuple[float, float]]:
    """{path: (‖Δ‖_2, ‖base‖_2)} for every leaf that changed (biases, norms, embeddings, head...):
    the part of an adapter the matrix lens does not see (e.g. BitFit, SSF shifts)."""
    fb, fa = paths.flatten(base), paths.flatten(adapted)
    missing = sorted(set(fb) ^ set(fa))
    if missing:
        raise ValueError(f"the trees differ in structure, e.g. {missing[:4]}")
    out = {}
    for p, x in fb.items():
        y = fa[p]
        if np.shape(x) != np.shape(y):
            raise ValueError(f"{p}: shape {np.shape(x)} vs {np.shape(y)}")
        d = float(np.linalg.norm(np.asarray(y, np.float64) - np.asarray(x, np.float64)))
        if d > 0:
            out[p] = (d, float(np.linalg.norm(np.asarray(x, np.float64))))
    return out


def table(spectra: Mapping[str, ModuleSpectra]) -> list[dict[str, Any]]:
    """All per-block summary rows, module by module."""
    return [row for s in spectra.values() for row in s.rows()]
