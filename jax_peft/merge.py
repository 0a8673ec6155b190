"""Merging an adapter back into a plain parameter tree (zero inference overhead).

`merge(params, method, adapter)` computes the whole merged tree at once; `merge(..., lazy=True)`
returns the same tree with `jax_peft.lazy_npz.LazyArray` leaves, each computed when it is read (the
frozen leaf read, e.g. from a lazily loaded checkpoint, and its site's edit applied), so that
`jax_peft.save_checkpoint` writes a merged model while holding about one leaf in host memory.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_peft import paths
from jax_peft.lazy_npz import LazyArray
from jax_peft.methods import base
from jax_peft.methods.base import Method
from jax_peft.methods.edits import Replace, apply_edits, leaf_sites
from jax_peft.sites import Site
from jax_peft.sites import sites as sites_of


def merge(params: Mapping[str, Any], method: Method, adapter: Mapping[str, Any], *,
          spec: Mapping[str, Any] | None = None, lazy: bool = False) -> dict:
    """A plain parameter tree (same structure as `params`, no adapter left) whose eval logits equal
    `model.apply({"params": method.apply(params, adapter)}, ...)`.

    Every leaf is computed and returned in the wider of float32 and its own dtype: float32 trees stay
    float32 (ready for `jax_peft.save_checkpoint`), bfloat16 trees are merged and returned in float32,
    float64 trees (jax x64) stay float64. The adapter must fit `params` and the method's options
    (`jax_peft.methods.base.check_adapter`, one error listing every mismatch); `spec` (the
    `method.spec(params)` recorded with the adapter) additionally refuses other hyper-parameters (e.g.
    LoRA's alpha) and another model whose shapes happen to fit (e.g. patch 8 vs 4 for RLRR / SSF).

    lazy=True: nothing is computed yet; the leaves are `LazyArray`s (shape and dtype known) whose
    values are computed when read (`np.asarray(leaf)`): the frozen leaf is read (a `LazyArray`, a
    numpy or jax array) and the edits touching it applied under jit, one group of leaves at a time
    (a site's kernel and bias; q, k and v for a fused-qkv edit); the group's other merged leaves are
    kept until they are read once. The values equal the eager merge's, bit for bit. Needs a method
    whose weight form is its edits (every ViT method, Swin LoRA / SSF; not rlrr_swin, which adds
    leaves: merge it with lazy=False).
    """
    if spec is not None:
        method.check_spec(spec, params)
    if lazy:
        return _LazyMerge(params, method, adapter).tree()
    wide = lambda t: jax.tree_util.tree_map(_at_least_f32, t)
    merged = jax.jit(lambda p, a: method.apply(p, a))(wide(params), wide(adapter))
    return wide(merged)


def _at_least_f32(x: Any) -> jax.Array:
    """`x` as float32, or float64 when it is float64 and jax's x64 mode is on (bfloat16 -> float32)."""
    dtype = jax.dtypes.canonicalize_dtype(jnp.promote_types(jnp.result_type(x), jnp.float32))
    return jnp.asarray(x, dtype)


def _generic_weight_form(method: Method, params: Mapping[str, Any]) -> Method:
    """The method that runs on `params` (a backbone variant's), refused when its `apply` is more than
    its edits folded in (then the merged tree cannot be computed site by site)."""
    m = method.on(params) if isinstance(method, base.BackboneVariants) else method
    fn = type(m).apply
    fn = getattr(fn, "__wrapped__", fn)
    if fn not in (Method.apply, base._method_apply):
        raise ValueError(f"merge(..., lazy=True) computes the merged leaves site by site from the edits, but "
                         f"{m.name}.apply does more than fold its edits in (e.g. it adds leaves); merge it with "
                         "lazy=False")
    return m


class _LazyMerge:
    """The state of one lazy merge: the frozen leaves, the edits and the merged leaves computed but
    not yet read. Leaves touched by the same edits form a group, computed together."""

    def __init__(self, params: Mapping[str, Any], method: Method, adapter: Mapping[str, Any]):
        self.flat = paths.flatten(params)
        self.dtypes = {k: _wide_dtype(v) for k, v in self.flat.items()}
        abstract = paths.unflatten({k: jax.ShapeDtypeStruct(tuple(np.shape(v)), self.dtypes[k])
                                    for k, v in self.flat.items()})
        method = _generic_weight_form(method, abstract)
        base.check_adapter(method, abstract, adapter)
        edits = method.edits(abstract, jax.tree_util.tree_map(_at_least_f32, adapter))
        self.site_map: dict[str, Site] | None = None
        self.group_of: dict[str, int] = {}  # leaf path -> group index
        self.groups: list[tuple[list[str], dict[str, Any]]] = []  # (leaf paths, edits in order)
        self.order = {key: i for i, key in enumerate(edits)}
        for key, edit in edits.items():
            touched = [key] if isinstance(edit, Replace) else self._touched(key, abstract)
            unknown = [k for k in touched if k not in self.flat]
            if unknown:
                raise ValueError(f"the edit at {key!r} touches {unknown}, which the parameters do not have")
            self._join(touched, key, edit)
        self.done: dict[str, np.ndarray] = {}
        self.lock = threading.RLock()

    def _touched(self, key: str, abstract: Mapping[str, Any]) -> list[str]:
        """The leaf paths a site edit changes (as `jax_peft.methods.edits.apply_edits` does)."""
        if self.site_map is None:
            self.site_map = sites_of(abstract)
        site = self.site_map.get(key)
        if site is None:
            raise ValueError(f"the edit targets site {key!r}, which this model does not have; sites look like "
                             f"{', '.join(list(self.site_map)[:6])}")
        return [k for s in leaf_sites(site, self.site_map) for k in (s.kernel, s.bias) if k is not None]

    def _join(self, touched: list[str], key: str, edit: Any) -> None:
        """Adds an edit, merging the groups of the leaves it touches (edits keep their order)."""
        ids = sorted({self.group_of[k] for k in touched if k in self.group_of})
        leaves, edits = [], {}
        for i in ids:
            leaves += self.groups[i][0]
            edits.update(self.groups[i][1])
            self.groups[i] = ([], {})
        edits = dict(sorted({**edits, key: edit}.items(), key=lambda kv: self.order[kv[0]]))
        self.groups.append((list(dict.fromkeys(leaves + touched)), edits))
        for k in self.groups[-1][0]:
            self.group_of[k] = len(self.groups) - 1

    def tree(self) -> dict:
        return paths.unflatten({k: LazyArray(np.shape(v), self.dtypes[k], self._reader(k), f"merged:{k}")
                                for k, v in self.flat.items()})

    def _reader(self, key: str) -> Any:
        return lambda index: self.value(key)[index]

    def value(self, key: str) -> np.ndarray:
        """The merged leaf at `key` (computed now, or kept from its group's computation)."""
        with self.lock:
            if key in self.done:
                return self.done.pop(key)
            if key not in self.group_of:  # no edit: the frozen leaf, widened
                x = self.flat[key]
                if isinstance(x, LazyArray) and x.dtype == self.dtypes[key]:
                    return _read(key, x)  # a fresh array already
                return np.asarray(_at_least_f32(_read(key, x)))
            leaves, edits = self.groups[self.group_of[key]]
            values = [_read(k, self.flat[k]) for k in leaves]
            try:
                sites, specs, payloads = self._local(leaves, edits)
                out = _merge_group(sites, specs, [_at_least_f32(v) for v in values], payloads)
                del values
                merged = {k: np.asarray(v) for k, v in zip(leaves, out)}
            except Exception as e:
                raise ValueError(f"cannot compute the merged leaf {key!r} (edits {list(edits)}): "
                                 f"{type(e).__name__}: {e}") from e
            self.done.update((k, v) for k, v in merged.items() if k != key)
            return merged[key]


    def _local(self, leaves: list[str], edits: Mapping[str, Any]) -> tuple[tuple, tuple, list]:
        """A group's computation with its leaves and sites renamed by position (`l0`, `s0`, ...): the
        same static structure in every block, so `_merge_group` compiles once per kind of group.
        Returns (local sites, edit specs, edit payload arrays)."""
        leaf = {k: f"l{i}" for i, k in enumerate(leaves)}
        names: dict[str, str] = {}
        local: dict[str, Site] = {}

        def add(real: str) -> str:
            if real not in names:
                names[real] = name = f"s{len(names)}"
                s = self.site_map[real]
                for other in (*s.parts, *([s.parent] if s.parent else [])):
                    add(other)
                local[name] = Site(name, s.kind, name, leaf[s.kernel] if s.kernel else None,
                                   leaf[s.bias] if s.bias else None, s.d_in, s.d_out,
                                   parts=tuple(names[p] for p in s.parts),
                                   parent=names[s.parent] if s.parent else None, offset=s.offset)
            return names[real]

        specs, payloads = [], []
        for key, edit in edits.items():
            fields = []
            for f in dataclasses.fields(edit):
                v = getattr(edit, f.name)
                if isinstance(v, (tuple, list)):  # LowRank's factors
                    fields.append((f.name, len(v)))
                    payloads.extend(v)
                elif isinstance(v, (bool, int, float, str)) or v is None:
                    fields.append((f.name, ("const", v)))
                else:
                    fields.append((f.name, None))
                    payloads.append(v)
            specs.append((leaf[key] if isinstance(edit, Replace) else add(key), type(edit), tuple(fields)))
        return tuple(local.items()), tuple(specs), payloads


@functools.partial(jax.jit, static_argnums=(0, 1))
def _merge_group(sites: tuple, specs: tuple, leaves: list, payloads: list) -> list:
    """The merged leaves `l0, l1, ...` of one group (see `_LazyMerge._local`), in the wider of float32
    and their dtypes: `apply_edits` under jit, as `merge` computes the whole tree (same fusions)."""
    payloads = list(payloads)
    edits = {}
    for key, kind, fields in specs:
        kw = {}
        for name, how in fields:
            if how is None:
                kw[name] = payloads.pop(0)
            elif isinstance(how, int):
                kw[name] = tuple(payloads.pop(0) for _ in range(how))
            else:
                kw[name] = how[1]
        edits[key] = kind(**kw)
    out = apply_edits({f"l{i}": x for i, x in enumerate(leaves)}, edits, dict(sites))
    return [_at_least_f32(out[f"l{i}"]) for i in range(len(leaves))]


def _read(path: str, x: Any) -> Any:
    """A frozen leaf's value (a LazyArray is read; arrays are kept); an error names the leaf."""
    if not isinstance(x, LazyArray):
        return x
    try:
        return x.read()
    except Exception as e:
        raise ValueError(f"cannot read the frozen leaf {path!r} ({x.source}) to merge it: "
                         f"{type(e).__name__}: {e}") from e


def _wide_dtype(x: Any) -> np.dtype:
    dtype = jnp.promote_types(np.dtype(getattr(x, "dtype", np.float32)), jnp.float32)
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))
