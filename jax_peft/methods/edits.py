"""The closed set of edits a method makes at a site, and the generic weight form built from them.

A method's `edits(params, adapter, *, rng=None)` returns `{key: Edit}`: the key is a site name
(`jax_peft.sites`) for the first three kinds and a parameter leaf path for `Replace`:

* `LowRank(factors, scale, dropout, dropout_after)`: ΔK = scale · F_0 F_1 … F_{n-1} on the site's
  (d_in, d_out) matrix view. A factor whose row count a is a proper divisor of the current width
  k·a acts on each width-a chunk (the block-diagonal kron(I_k, F), never built): FacT's chunked MLP.
  Activation form: a `vit.SidePath` beside the frozen layer (dropout on the input, -1, or after
  factor j).
* `OutputAffine(scale, shift)`: y ⊙ γ + β on the site's output (SSF). Weight form: the kernel's
  columns times γ, b ⊙ γ + β. Activation form on sites with a hook: a `vit.ScaleShift`.
* `Rescale(s_in, s_out, shift)`: K ⊙ (1 + s_in s_outᵀ) and b + shift (RLRR). Weight form only.
* `Replace(value)`: the leaf at the key's path becomes `value` (BitFit, full fine-tuning).

Each kind states whether it has an activation form (`activation`) and, in `affine`, why the weight
form is not affine in the edit's leaves (None: it is), from which `Method` derives its traits.

On a composite site (e.g. the ViT's `block3/qkv` = [q | k | v]) an edit is split along d_out into
its parts; on a slice site (e.g. the Swin's `stage0/block1/q` inside its fused qkv kernel) it is
widened to the parent's columns, neutral outside the slice. Everything is computed in the wider of float32 and the operands' dtypes (float64 stays
float64, bfloat16 is computed in float32) with HIGHEST matmul precision, and cast back once to each
parameter's own dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jax_peft import paths
from jax_peft.sites import Site, matrix_view
from jax_peft.sites import sites as sites_of

Tree = Mapping[str, Any]
HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class LowRank:
    """ΔK = scale · F_0 … F_{n-1} (chunk rule in the module docstring); `dropout` acts in the
    activation form only, on the input (dropout_after=-1) or after factor `dropout_after`."""

    factors: tuple
    scale: float = 1.0
    dropout: float = 0.0
    dropout_after: int = -1
    activation: ClassVar[bool] = True
    affine: ClassVar[str | None] = "ΔK = s·F_0 F_1 … is multilinear in its factors"


@dataclasses.dataclass(frozen=True)
class OutputAffine:
    """y ⊙ scale + shift on the site's output; scale, shift (d_out,)."""

    scale: Any
    shift: Any
    activation: ClassVar[bool] = True
    affine: ClassVar[str | None] = None  # K·diag γ and b ⊙ γ + β are linear in (γ, β)


@dataclasses.dataclass(frozen=True)
class Rescale:
    """K ⊙ (1 + s_in s_outᵀ), b + shift; s_in (d_in,), s_out and shift (d_out,)."""

    s_in: Any
    s_out: Any
    shift: Any
    activation: ClassVar[bool] = False
    affine: ClassVar[str | None] = "K ⊙ (1 + s_in s_outᵀ) is bilinear in (s_in, s_out)"


@dataclasses.dataclass(frozen=True)
class Replace:
    """The parameter leaf at the edit's key (a leaf path) becomes `value` (same shape)."""

    value: Any
    activation: ClassVar[bool] = False
    affine: ClassVar[str | None] = None


Edit = LowRank | OutputAffine | Rescale | Replace
KINDS: tuple[type, ...] = (LowRank, OutputAffine, Rescale, Replace)


def compute_dtype(*xs: Any) -> Any:
    """The wider of float32 and the operands' dtypes."""
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


# --- low-rank increments -------------------------------------------------------------------------
def _chunked(h: jax.Array, f: jax.Array) -> jax.Array:
    """h (n, w) @ f (a, b) for w = a, or f applied to each of h's k = w/a chunks: (n, k·b)."""
    w, a = h.shape[-1], f.shape[0]
    if w == a:
        return jnp.matmul(h, f, precision=HI)
    if w % a:
        raise ValueError(f"low-rank factor with {a} rows cannot act on width {w}: the rows must equal the "
                         "width or divide it (block-diagonal chunks)")
    return jnp.matmul(h.reshape(-1, a), f, precision=HI).reshape(h.shape[0], (w // a) * f.shape[1])


def lowrank_delta(edit: LowRank, d_in: int) -> jax.Array:
    """The dense increment (d_in, d_out) of a `LowRank` edit, in `compute_dtype` of its factors."""
    ct = compute_dtype(*edit.factors)
    fs = [jnp.asarray(f).astype(ct) for f in edit.factors]
    first, rest = fs[0], fs[1:]
    a = first.shape[0]
    if a == d_in:
        out = first
    elif d_in % a == 0 and rest:  # kron(I_k, F_0) @ F_1 without building kron: row block i = F_0 F_1[i]
        k, b = d_in // a, first.shape[1]
        out = jnp.einsum("ab,ibc->iac", first, rest[0].reshape(k, b, -1), precision=HI).reshape(d_in, -1)
        rest = rest[1:]
    else:
        raise ValueError(f"low-rank factor with {a} rows cannot act on input width {d_in}")
    for f in rest:
        out = _chunked(out, f)
    return out if edit.scale == 1.0 else out * jnp.asarray(edit.scale, ct)


# --- the weight form -----------------------------------------------------------------------------
def _columns(x: Any, start: int, n: int) -> Any:
    return x[..., start:start + n]


def leaf_sites(site: Site, site_map: Mapping[str, Site]) -> list[Site]:
    """The sites whose kernel/bias leaves an edit on `site` changes: a slice site's parent, a composite
    site's parts, or the site itself."""
    if site.parent is not None:
        return [site_map[site.parent]]
    return [site_map[name] for name in site.parts] if site.parts else [site]


def _parts(site: Site, edit: Edit, site_map: Mapping[str, Site]) -> list[tuple[Site, Any]]:
    """[(leaf site, payload)]: a composite site's edit split along d_out; LowRank becomes its dense
    increment."""
    payload: Any = lowrank_delta(edit, site.d_in) if isinstance(edit, LowRank) else edit
    targets = leaf_sites(site, site_map)
    if site.parent is not None:
        return [(targets[0], _widen(payload, site.offset, site.d_out, targets[0].d_out))]
    if not site.parts:
        return [(site, payload)]
    out, start = [], 0
    for part in targets:
        n = part.d_out
        if isinstance(payload, OutputAffine):
            piece: Any = OutputAffine(_columns(payload.scale, start, n), _columns(payload.shift, start, n))
        elif isinstance(payload, Rescale):
            piece = Rescale(payload.s_in, _columns(payload.s_out, start, n), _columns(payload.shift, start, n))
        else:
            piece = _columns(payload, start, n)
        out.append((part, piece))
        start += n
    if start != site.d_out:
        raise ValueError(f"composite site {site.name} has parts of total width {start}, not {site.d_out}")
    return out


def _widen(payload: Any, offset: int, n: int, width: int) -> Any:
    """A slice site's payload (n output columns at `offset`) as one on its parent's `width` columns,
    neutral elsewhere (increment 0, output scale 1, s_out 0, shift 0): exact, as x·1 = x + 0 = x."""
    def pad(x: Any, fill: float) -> Any:
        x = jnp.asarray(x)
        lead = x.shape[:-1]
        if x.shape[-1] != n:
            raise ValueError(f"a slice edit has {x.shape[-1]} output columns, the slice has {n}")
        return jnp.concatenate([jnp.full(lead + (offset,), fill, x.dtype), x,
                                jnp.full(lead + (width - offset - n,), fill, x.dtype)], axis=-1)

    if isinstance(payload, OutputAffine):
        return OutputAffine(pad(jnp.reshape(payload.scale, -1), 1.0), pad(jnp.reshape(payload.shift, -1), 0.0))
    if isinstance(payload, Rescale):
        return Rescale(payload.s_in, pad(jnp.reshape(payload.s_out, -1), 0.0), pad(jnp.reshape(payload.shift, -1), 0.0))
    return pad(payload, 0.0)


def _check_shape(site: Site, what: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{what} for site {site.name} has shape {tuple(got)}, expected {tuple(want)}; was the "
                         "adapter built for a different model? Re-create it with method.init(rng, params).")


def _edit_site(flat: dict[str, Any], site: Site, payload: Any) -> None:
    """Applies one (non-composite) edit to the flat parameter dict in place."""
    k = flat[site.kernel]
    b = flat[site.bias] if site.bias else None
    if isinstance(payload, OutputAffine):
        ct = compute_dtype(k, payload.scale, payload.shift)
        g, beta = jnp.asarray(payload.scale, ct).reshape(-1), jnp.asarray(payload.shift, ct).reshape(-1)
        _check_shape(site, "output scale", g.shape, (site.d_out,))
        _check_shape(site, "output shift", beta.shape, (site.d_out,))
        flat[site.kernel] = (matrix_view(jnp.asarray(k, ct), site) * g[None, :]).reshape(k.shape).astype(jnp.result_type(k))
        if b is None:
            raise ValueError(f"site {site.name} has no bias to take the output shift")
        flat[site.bias] = (jnp.asarray(b, ct).reshape(-1) * g + beta).reshape(b.shape).astype(jnp.result_type(b))
    elif isinstance(payload, Rescale):
        ct = compute_dtype(k, payload.s_in, payload.s_out, payload.shift)
        s_in, s_out = jnp.asarray(payload.s_in, ct).reshape(-1), jnp.asarray(payload.s_out, ct).reshape(-1)
        view = matrix_view(jnp.asarray(k, ct), site)
        _check_shape(site, "s_in", s_in.shape, (view.shape[0],))
        _check_shape(site, "s_out", s_out.shape, (site.d_out,))
        flat[site.kernel] = (view + view * (s_in[:, None] * s_out[None, :])).reshape(k.shape).astype(jnp.result_type(k))
        f = jnp.asarray(payload.shift, ct).reshape(-1)
        _check_shape(site, "shift", f.shape, (site.d_out,))
        flat[site.bias] = (jnp.asarray(b, ct).reshape(-1) + f).reshape(b.shape).astype(jnp.result_type(b))
    else:  # a dense increment (d_in, d_out)
        ct = compute_dtype(k, payload)
        view = matrix_view(jnp.asarray(k, ct), site)
        _check_shape(site, "increment", payload.shape, view.shape)
        flat[site.kernel] = (view + payload).reshape(k.shape).astype(jnp.result_type(k))


def apply_edits(params: Tree, edits: Mapping[str, Edit], site_map: Mapping[str, Site] | None = None) -> dict:
    """The weight form: a new tree like `params` with every edit folded in (params is not modified).
    `site_map` defaults to `jax_peft.sites.sites(params)` (read only when a site edit needs it)."""
    flat = paths.flatten(params)
    for key, edit in edits.items():
        if isinstance(edit, Replace):
            if key not in flat:
                raise ValueError(f"the edit replaces {key!r}, which the parameters do not have")
            old = flat[key]
            _check_shape(Site(key, "leaf", key, key, None, 0, 0), "replacement", jnp.shape(edit.value),
                         jnp.shape(old))
            flat[key] = jnp.asarray(edit.value, jnp.result_type(old))
            continue
        if not isinstance(edit, KINDS):
            raise TypeError(f"edit at {key!r} is a {type(edit).__name__}; edits are LowRank, OutputAffine, "
                            "Rescale or Replace")
        if site_map is None:
            site_map = sites_of(params)
        site = site_map.get(key)
        if site is None:
            raise ValueError(f"the edit targets site {key!r}, which this model does not have; sites look like "
                             f"{', '.join(list(site_map)[:6])}")
        for leaf_site, payload in _parts(site, edit, site_map):
            _edit_site(flat, leaf_site, payload)
    return paths.unflatten(flat)
