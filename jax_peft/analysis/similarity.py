"""Subspace similarity: principal angles and the normalized similarity φ of LoRA / EFFT.

Everything here is pure `jax.numpy`, batched over leading axes, and safe under `jax.jit`.

    φ(A, B, i, j) = ‖U_A[:, :i]ᵀ U_B[:, :j]‖²_F / min(i, j)   ∈ [0, 1]

where U_A, U_B are the singular vectors of A and B on one side, sorted by singular value. φ = 1 when
the smaller of the two subspaces lies inside the other, 0 when they are orthogonal. It is the mean of
cos² of the min(i, j) principal angles between the two subspaces.

Sides: for a matrix stored as the Flax kernel view (in, out) with `y = x K`, "left" singular vectors
(columns of U) span directions of the *input* space and "right" ones (rows of Vᵀ) the *output* space.
(The LoRA paper's "right-singular vectors of A" for PyTorch's A ∈ R^{r×d_in} are input-space vectors,
i.e. side="left" here.)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def singular_vectors(m: Array, side: str = "left") -> tuple[Array, Array]:
    """(basis, s): orthonormal singular vectors of `m` (..., p, q) on `side` as columns
    (..., p, r) for "left" or (..., q, r) for "right", r = min(p, q), sorted by decreasing
    singular value `s` (..., r)."""
    _check_side(side)
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    return (u if side == "left" else jnp.swapaxes(vt, -1, -2)), s


def principal_angles(qa: Array, qb: Array) -> Array:
    """Principal angles (radians, ascending) between span(qa) and span(qb).

    qa: (..., n, ka), qb: (..., n, kb), both with orthonormal columns. Returns (..., min(ka, kb)).
    Small angles come from the sines (the part of the smaller basis outside the larger one) and
    large angles from the cosines (Björck & Golub), so both ends are accurate in float32.
    """
    if qa.shape[-2] != qb.shape[-2]:
        raise ValueError(f"bases live in different spaces: {qa.shape[-2]} vs {qb.shape[-2]} rows")
    if qa.shape[-1] < qb.shape[-1]:  # make qa the larger basis; the angles are symmetric
        qa, qb = qb, qa
    m = jnp.swapaxes(qa, -1, -2) @ qb  # (..., ka, kb)
    cos = jnp.clip(jnp.linalg.svd(m, compute_uv=False), 0.0, 1.0)  # descending
    resid = qb - qa @ m  # component of span(qb) outside span(qa)
    sin = jnp.clip(jnp.linalg.svd(resid, compute_uv=False), 0.0, 1.0)[..., ::-1]  # ascending
    return jnp.where(cos ** 2 < 0.5, jnp.arccos(cos), jnp.arcsin(sin))


def top_subspace_angles(a: Array, b: Array, k: int, side: str = "left") -> Array:
    """Principal angles (..., k) between the top-k singular subspaces of `a` and `b` on `side`."""
    ua, _ = singular_vectors(a, side)
    ub, _ = singular_vectors(b, side)
    _check_k(k, ua.shape[-1], "k")
    _check_k(k, ub.shape[-1], "k")
    return principal_angles(ua[..., :k], ub[..., :k])


def basis_phi_grid(ua: Array, ub: Array, i_values: Sequence[int], j_values: Sequence[int]) -> Array:
    """φ(i, j) for orthonormal bases ua (..., n, ra), ub (..., n, rb) whose columns are sorted by
    importance. Returns (..., len(i_values), len(j_values)). One product UaᵀUb serves the whole
    grid: φ(i, j) = Σ_{a<i, b<j} (UaᵀUb)²_ab / min(i, j)."""
    if ua.shape[-2] != ub.shape[-2]:
        raise ValueError(f"bases live in different spaces: {ua.shape[-2]} vs {ub.shape[-2]} rows")
    iv = _grid_values(i_values, ua.shape[-1], "i")
    jv = _grid_values(j_values, ub.shape[-1], "j")
    g = jnp.swapaxes(ua[..., : max(iv)], -1, -2) @ ub[..., : max(jv)]
    c = jnp.cumsum(jnp.cumsum(g ** 2, axis=-2), axis=-1)
    sub = c[..., np.asarray(iv)[:, None] - 1, np.asarray(jv)[None, :] - 1]
    return sub / np.minimum.outer(np.asarray(iv), np.asarray(jv)).astype(np.float32)


def phi_grid(a: Array, b: Array, i_values: Sequence[int], j_values: Sequence[int], *,
             side: str = "left", rtol: float | None = None, atol_a: float | Array = 0.0,
             atol_b: float | Array = 0.0) -> Array:
    """φ(a, b, i, j) over a grid, from the singular vectors of matrices a (..., p, q) and b.

    Entries with i beyond the numerical rank of `a` (or j beyond that of `b`) are NaN: those
    singular vectors span an arbitrary part of a null space and carry no information. `rtol`:
    relative tolerance of the numerical rank (default max(p, q)·eps, NumPy's convention);
    `atol_a`, `atol_b`: absolute floors (scalars or (...,) arrays), e.g. the float32 rounding floor
    of a difference of weights (see `spectral.rounding_floor`). Returns (..., len(i_values), len(j_values)).
    """
    ua, sa = singular_vectors(a, side)
    ub, sb = singular_vectors(b, side)
    grid = basis_phi_grid(ua, ub, i_values, j_values)
    ra = numerical_rank(sa, rtol=_default_rtol(a, rtol), atol=atol_a)
    rb = numerical_rank(sb, rtol=_default_rtol(b, rtol), atol=atol_b)
    iv = jnp.asarray(list(i_values))
    jv = jnp.asarray(list(j_values))
    ok = (iv[:, None] <= ra[..., None, None]) & (jv[None, :] <= rb[..., None, None])
    return jnp.where(ok, grid, jnp.nan)


def phi(a: Array, b: Array, i: int, j: int, *, side: str = "left", rtol: float | None = None) -> Array:
    """The normalized subspace similarity φ(a, b, i, j) ∈ [0, 1] (NaN beyond a numerical rank)."""
    return phi_grid(a, b, [i], [j], side=side, rtol=rtol)[..., 0, 0]


def numerical_rank(s: Array, *, rtol: float | None = None, atol: float | Array = 0.0) -> Array:
    """Number of singular values `s` (..., r) (descending) above max(rtol·s_max, atol).
    Default rtol = r·eps(float32) (the usual convention uses max(p, q)·eps; pass it explicitly)."""
    if rtol is None:
        rtol = s.shape[-1] * float(jnp.finfo(s.dtype).eps)
    tol = jnp.maximum(rtol * s[..., :1], jnp.asarray(atol, s.dtype)[..., None])
    return jnp.sum(s > tol, axis=-1)


def _default_rtol(m: Array, rtol: float | None) -> float:
    if rtol is not None:
        return rtol
    return max(m.shape[-2:]) * float(jnp.finfo(jnp.result_type(m, jnp.float32)).eps)


def _grid_values(values: Sequence[int], limit: int, name: str) -> list[int]:
    vals = [int(v) for v in values]
    if not vals:
        raise ValueError(f"empty list of {name} values; give ranks such as [1, 2, 4, 8]")
    for v in vals:
        _check_k(v, limit, name)
    return vals


def _check_k(k: int, limit: int, name: str) -> None:
    if not 1 <= int(k) <= limit:
        raise ValueError(f"{name}={k} is out of range: it must be between 1 and {limit} (the number of "
                         "singular vectors available for this matrix)")


def _check_side(side: str) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' (input space of a (in, out) kernel) or 'right' "
                         f"(output space), got {side!r}")


# --- between two adapters or runs, per matrix -------------------------------------------------
@functools.partial(jax.jit, static_argnames=("i_values", "j_values", "side", "rtol"))
def _delta_phi(base: Array, a: Array, b: Array, i_values: tuple[int, ...], j_values: tuple[int, ...],
               side: str, rtol: float | None) -> Array:
    from jax_peft.analysis.spectral import rounding_floor

    return phi_grid(a - base, b - base, i_values, j_values, side=side, rtol=rtol,
                    atol_a=rounding_floor(a), atol_b=rounding_floor(b))


def adapter_similarity(params: Mapping[str, Any], run_a: Any, run_b: Any, *,
                       i_values: Sequence[int] = (1, 2, 4, 8), j_values: Sequence[int] | None = None,
                       space: str = "input", modules: Iterable[str] | None = None,
                       blocks: Sequence[int] | None = None, rtol: float | None = None) -> dict[str, np.ndarray]:
    """φ(ΔW_a, ΔW_b, i, j) per module and block between two adapters or runs on the same base.

    run_a, run_b: each a `(method, adapter)` pair (merged with `jax_peft.merge`) or a plain merged
    parameter tree (e.g. a fully fine-tuned run). ΔW = merged − params per matrix view (in, out).
    space: "input" (left singular vectors of ΔW, as LoRA/EFFT's analyses of the down-projection)
    or "output" (right singular vectors). Returns {module: (blocks, len(i_values), len(j_values))};
    NaN where i (j) exceeds the numerical rank of ΔW_a (ΔW_b), e.g. everywhere for a module an
    adapter leaves unchanged.
    """
    from jax_peft.analysis.spectral import ALL_MODULES, module_matrices

    if space not in ("input", "output"):
        raise ValueError(f"space must be 'input' or 'output', got {space!r}")
    side = "left" if space == "input" else "right"
    merged_a, merged_b = _merged(params, run_a, "run_a"), _merged(params, run_b, "run_b")
    iv = tuple(int(v) for v in i_values)
    jv = iv if j_values is None else tuple(int(v) for v in j_values)
    out = {}
    for m in (ALL_MODULES if modules is None else tuple(modules)):
        w = module_matrices(params, m, blocks)
        out[m] = np.asarray(_delta_phi(w, module_matrices(merged_a, m, blocks),
                                       module_matrices(merged_b, m, blocks), iv, jv, side, rtol))
    return out


def _merged(params: Mapping[str, Any], run: Any, name: str) -> Mapping[str, Any]:
    if isinstance(run, tuple) and len(run) == 2 and not isinstance(run[0], Mapping):
        from jax_peft.merge import merge

        return merge(params, run[0], run[1])
    if isinstance(run, Mapping):
        return run
    raise TypeError(f"{name} must be a (method, adapter) pair or a merged parameter tree, "
                    f"got {type(run).__name__}")
