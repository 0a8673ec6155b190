"""Adapter arithmetic: several named adapters on one base, and weighted combinations (task arithmetic).

Two combination spaces, chosen honestly:

- **delta space** (always defined): every method has a weight form, so each adapter is a task vector
  τ_i = merge(params, method_i, adapter_i) − params (a plain tree), and
  `params + Σ w_i τ_i` is a plain parameter tree. Adapters of different methods may be mixed.
  For LoRA this combines the ΔW = s·AB products, never A and B separately.
- **leaf space** (only where it means the same thing): `Σ w_i a_i` (or `a_0 + Σ w_i (a_i − a_0)`)
  gives one adapter of the same method. It equals the delta-space combination exactly when the
  method's `apply` is affine in its leaves, which follows from its edit kinds
  (`Method.affine_in_leaves`): replacements (BitFit, full fine-tuning), no edits (linear probing) and
  output scale/shift (SSF: K·diag γ, b ⊙ γ + β are linear in (γ, β)) are; low-rank products (LoRA,
  FacT-TT/TK, EFFT: multilinear in the factors) and RLRR's rescaling (K ⊙ (1 + s_in s_outᵀ),
  bilinear) are not, and are refused: averaging factors is not averaging increments.
  When the weights sum to 1 the plain weighted sum is used; otherwise the combination is taken
  around the method's identity adapter a_0 (apply(params, a_0) = params), which is built and checked.

Heads are task specific (class counts differ), so combinations keep the base head unless
`include_head=True` (then heads are combined like any other leaf and must have equal shapes).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_peft import paths
from jax_peft.merge import merge
from jax_peft.methods.base import Method, method_class, method_names

Tree = Mapping[str, Any]


def __getattr__(name: str) -> Any:
    if name == "AFFINE_METHODS":  # the registered methods affine in their leaves (computed on access)
        return frozenset(n for n in method_names() if method_class(n).affine_in_leaves())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- functional core --------------------------------------------------------------------------
def task_vector(params: Tree, method: Method, adapter: Tree, *, include_head: bool = False) -> dict:
    """τ = merge(params, method, adapter) − params, a tree like `params` (float32). The head
    entry is dropped unless `include_head`."""
    merged = merge(params, method, adapter)
    delta = jax.tree_util.tree_map(lambda a, b: a - jnp.asarray(b, jnp.float32), merged, dict(params))
    return delta if include_head else _without_head(delta)


def apply_delta(params: Tree, delta: Tree, scale: float = 1.0) -> dict:
    """params + scale·delta; `delta` may omit subtrees (e.g. the head), which are kept from params."""
    flat_p, flat_d = paths.flatten(params), paths.flatten(delta)
    extra = [p for p in flat_d if p not in flat_p]
    if extra:
        raise ValueError(f"delta has paths the params do not have, e.g. {extra[:4]}")
    out = {}
    for p, x in flat_p.items():
        if p in flat_d:
            if np.shape(flat_d[p]) != np.shape(x):
                raise ValueError(f"{p}: delta shape {np.shape(flat_d[p])} vs params {np.shape(x)}")
            out[p] = jnp.asarray(x, jnp.float32) + scale * jnp.asarray(flat_d[p], jnp.float32)
        else:
            out[p] = x
    return paths.unflatten(out)


def combine_deltas(params: Tree, deltas: Sequence[Tree], weights: Sequence[float]) -> dict:
    """params + Σ w_i δ_i for task vectors δ_i (trees over subsets of params' paths)."""
    weights = _weights(weights, len(deltas))
    flat = [paths.flatten(d) for d in deltas]
    keys = list(dict.fromkeys(p for f in flat for p in f))
    total = {}
    for p in keys:
        terms = [(w, f[p]) for w, f in zip(weights, flat) if p in f]
        shapes = {np.shape(t) for _, t in terms}
        if len(shapes) > 1:
            raise ValueError(f"{p}: the task vectors disagree in shape {sorted(shapes)}; they must "
                             "come from adapters of the same base model")
        total[p] = sum(w * jnp.asarray(t, jnp.float32) for w, t in terms)
    return apply_delta(params, paths.unflatten(total))


def combine_adapters(params: Tree, method: Method, adapters: Sequence[Tree], weights: Sequence[float], *,
                     identity: Tree | None = None) -> dict:
    """One adapter of `method` whose merge equals params + Σ w_i τ_i (leaf-space task arithmetic).

    Only for methods affine in their leaves (`method.affine_in_leaves()`); raises otherwise, pointing to
    `combine_deltas`. If Σw = 1 the result is Σ w_i a_i; else a_0 + Σ w_i (a_i − a_0) with a_0 the
    identity adapter (`identity`, or `identity_adapter(params, method)`). The adapters must share
    tree structure, shapes and the method's hyper-parameters (pass one `method`).
    """
    name = getattr(method, "name", type(method).__name__)
    if not method.affine_in_leaves():
        why = method.not_affine_because() or "its apply is not known to be affine in the adapter leaves"
        raise ValueError(
            f"leaf-space combination is not defined for {name!r}: {why}, so a weighted sum of adapter "
            "leaves is not the weighted sum of their weight increments. Combine in delta space instead: "
            "AdapterBank.combine(weights, space='delta') or combine_deltas(params, [task_vector(...)], w).")
    weights = _weights(weights, len(adapters))
    _check_same_structure(adapters)
    if abs(sum(weights) - 1.0) < 1e-6:
        return jax.tree_util.tree_map(
            lambda *xs: sum(w * jnp.asarray(x, jnp.float32) for w, x in zip(weights, xs)), *adapters)
    a0 = identity_adapter(params, method, like=adapters[0]) if identity is None else identity
    _check_same_structure([a0, adapters[0]])
    return jax.tree_util.tree_map(
        lambda z, *xs: jnp.asarray(z, jnp.float32) + sum(w * (jnp.asarray(x, jnp.float32) - jnp.asarray(z, jnp.float32))
                                                         for w, x in zip(weights, xs)), a0, *adapters)


def identity_adapter(params: Tree, method: Method, *, like: Tree | None = None, atol: float = 0.0) -> dict:
    """An adapter a_0 of `method` with apply(params, a_0) = params, checked.

    Tried in order: `method.init` (BitFit / full / linear copy the base leaves), then leaves named
    `*scale` = 1 and everything else 0 (SSF's γ, β), shaped like `like` or the init.
    """
    init = method.init(jax.random.PRNGKey(0), params)
    template = init if like is None else like
    by_name = paths.map_with_path(
        lambda p, x: jnp.ones(np.shape(x), jnp.float32) if p.rsplit("/", 1)[-1].endswith("scale")
        else jnp.zeros(np.shape(x), jnp.float32), template) if paths.flatten(template) else {}
    candidates = [init, by_name]
    base = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), dict(params))
    for cand in candidates:
        try:
            _check_same_structure([cand, template])
            eff = merge(params, method, cand)
        except (ValueError, TypeError):
            continue
        if all(bool(jnp.all(jnp.abs(a - b) <= atol)) for a, b in
               zip(jax.tree_util.tree_leaves(eff), jax.tree_util.tree_leaves(base))):
            return cand
    raise ValueError(f"could not build an identity adapter for {getattr(method, 'name', method)!r} "
                     "(apply(params, a_0) == params); pass identity=... or use weights that sum to 1")


# --- a small immutable bank -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
    """One named adapter: its method, its leaves, and optionally its task head {"kernel", "bias"}."""

    method: Method
    adapter: Tree
    head: Tree | None = None


@dataclasses.dataclass(frozen=True)
class AdapterBank:
    """Named adapters on one frozen base. Immutable: `add`/`remove` return new banks.

        bank = AdapterBank(params).add("dtd", lora, a1, head=h1).add("pets", lora, a2, head=h2)
        eff = bank.effective("dtd")                        # method.apply with the task head
        merged = bank.combine({"dtd": 0.5, "pets": 0.5})   # delta space: a plain tree
        method, adapter, head = bank.combine({...}, space="leaves")   # affine methods only
    """

    base: Tree
    entries: Mapping[str, Entry] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "entries", types.MappingProxyType(dict(self.entries)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> Entry:
        if name not in self.entries:
            raise KeyError(f"no adapter named {name!r}; the bank holds {list(self.entries) or 'nothing'}")
        return self.entries[name]

    def add(self, name: str, method: Method, adapter: Tree, *, head: Tree | None = None) -> AdapterBank:
        """A new bank with `name` added (the name must be new). The adapter is checked by applying
        it to the base (shape-only, no compute)."""
        if name in self.entries:
            raise ValueError(f"an adapter named {name!r} is already in the bank; remove it first")
        if head is not None:
            _check_head(head, name)
        try:
            jax.eval_shape(lambda p, a: method.apply(p, a), self._with_head(head), adapter)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ValueError(f"adapter {name!r} does not fit this base for method "
                             f"{getattr(method, 'name', method)!r}: {e}") from e
        return AdapterBank(self.base, {**self.entries, name: Entry(method, adapter, head)})

    def remove(self, name: str) -> AdapterBank:
        self[name]
        return AdapterBank(self.base, {k: v for k, v in self.entries.items() if k != name})

    def params(self, name: str) -> dict:
        """The base with the entry's head (or the base head when it has none)."""
        return self._with_head(self[name].head)

    def effective(self, name: str) -> dict:
        e = self[name]
        return e.method.apply(self._with_head(e.head), e.adapter)

    def merged(self, name: str) -> dict:
        e = self[name]
        return merge(self._with_head(e.head), e.method, e.adapter)

    def task_vector(self, name: str) -> dict:
        e = self[name]
        return task_vector(self.base, e.method, e.adapter)

    def combine(self, weights: Mapping[str, float], *, space: str = "delta", head: str | None = None,
                include_head: bool = False) -> Any:
        """Weighted combination of named adapters.

        space="delta": a plain parameter tree, base + Σ w·τ (any methods, the base head, or the head
        of entry `head`, or with `include_head` the weighted sum of the entries' heads).
        space="leaves": `(method, adapter, head)` of the shared method (affine methods only; all entries
        must use an equal method, i.e. the same method and hyper-parameters). Heads as above.
        """
        if not weights:
            raise ValueError("no weights given; pass e.g. {'task_a': 0.5, 'task_b': 0.5}")
        names = list(weights)
        ents = [self[n] for n in names]
        w = [float(weights[n]) for n in names]
        if head is not None and include_head:
            raise ValueError("give either head=NAME or include_head=True, not both")
        if space == "delta":
            out = combine_deltas(self.base, [task_vector(self.base, e.method, e.adapter) for e in ents], w)
            return {**out, "head": self._combined_head(ents, w, head, include_head)}
        if space in ("leaves", "leaf"):
            m0 = ents[0].method
            for n, e in zip(names, ents):
                if e.method != m0:
                    raise ValueError(f"leaf-space combination needs one method with equal hyper-parameters; "
                                     f"{names[0]!r} uses {m0!r} but {n!r} uses {e.method!r}. "
                                     "Use space='delta' to combine different methods.")
            adapter = combine_adapters(self.base, m0, [e.adapter for e in ents], w)
            return m0, adapter, self._combined_head(ents, w, head, include_head)
        raise ValueError(f"unknown space {space!r}; use 'delta' or 'leaves'")

    # -- helpers --
    def _with_head(self, head: Tree | None) -> dict:
        return dict(self.base) if head is None else {**self.base, "head": head}

    def _combined_head(self, ents: Sequence[Entry], w: Sequence[float], head: str | None,
                       include_head: bool) -> Any:
        if head is not None:
            h = self[head].head
            return self.base["head"] if h is None else h
        if not include_head:
            return self.base["head"]
        heads = [self.base["head"] if e.head is None else e.head for e in ents]
        base_h = self.base["head"]
        deltas = []
        for h in heads:
            if jax.tree_util.tree_map(np.shape, dict(h)) != jax.tree_util.tree_map(np.shape, dict(base_h)):
                raise ValueError("include_head=True needs heads of equal shape (same classes); "
                                 "pass head=NAME to pick one task's head instead")
            deltas.append(jax.tree_util.tree_map(lambda a, b: jnp.asarray(a, jnp.float32) - b, dict(h), dict(base_h)))
        return combine_deltas(dict(base_h), deltas, w)


# --- checks -----------------------------------------------------------------------------------
def _weights(weights: Sequence[float], n: int) -> list[float]:
    w = [float(x) for x in weights]
    if len(w) != n or n == 0:
        raise ValueError(f"got {len(w)} weights for {n} adapters; give one weight per adapter")
    if not all(np.isfinite(w)):
        raise ValueError(f"weights must be finite, got {w}")
    return w


def _check_same_structure(trees: Sequence[Tree]) -> None:
    ref = paths.flatten(trees[0])
    for i, t in enumerate(trees[1:], 1):
        flat = paths.flatten(t)
        if set(flat) != set(ref):
            diff = sorted(set(flat) ^ set(ref))
            raise ValueError(f"adapter {i} has different leaves than adapter 0, e.g. {diff[:4]}; "
                             "combine adapters of the same method and hyper-parameters")
        bad = [p for p in ref if np.shape(flat[p]) != np.shape(ref[p])]
        if bad:
            raise ValueError(f"adapter {i} differs in shape at {bad[0]}: {np.shape(flat[bad[0]])} vs "
                             f"{np.shape(ref[bad[0]])} (different rank or model?)")


def _check_head(head: Tree, name: str) -> None:
    if not isinstance(head, Mapping) or set(head) != {"kernel", "bias"}:
        raise ValueError(f"head of {name!r} must be {{'kernel': (D, C), 'bias': (C,)}}")


def _without_head(tree: Tree) -> dict:
    return {k: v for k, v in tree.items() if k != "head"}
