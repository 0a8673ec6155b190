"""A jitted forward whose adapter is an argument: swapping adapters (and heads) of the same structure
reuses one compiled program.

    fwd = SwappableForward(model, method)
    logits_a = fwd(params, adapter_a, images)     # compiles once
    logits_b = fwd(params, adapter_b, images)     # same shapes: no recompilation
    fwd.num_compilations                          # 1
    all_logits = fwd.stacked(params, [adapter_a, adapter_b], images)   # (N, B, C), one vmapped call

The method is part of the program (it is a frozen, hashable dataclass of hyper-parameters); only
the arrays are arguments, so a new adapter with the same tree structure, shapes and dtypes costs no
compilation, while a different structure (another rank, another method) compiles a new program.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jax_peft.methods.base import Method

Tree = Mapping[str, Any]


class SwappableForward:
    """`logits = fwd(params, adapter, images)` (eval mode), jitted once per input structure.

    `num_traces` counts Python traces of `__call__`'s program (one per new input structure, counted
    inside the traced function; `stacked` has its own program and is not counted);
    `num_compilations` reads jax's compilation cache of this function (`_cache_size`, falling back
    to the trace count on jax versions without it).
    """

    def __init__(self, model: Any, method: Method):
        self.model = model
        self.method = method
        self.num_traces = 0

        def body(params: Tree, adapter: Tree, images: jax.Array) -> jax.Array:
            return model.apply({"params": method.apply(params, adapter)}, images, train=False)

        def forward(params: Tree, adapter: Tree, images: jax.Array) -> jax.Array:
            self.num_traces += 1  # runs at trace time only
            return body(params, adapter, images)

        self._jit = jax.jit(forward)
        self._stacked = jax.jit(jax.vmap(body, in_axes=(None, 0, None)))

    def __call__(self, params: Tree, adapter: Tree, images: jax.Array) -> jax.Array:
        return self._jit(params, adapter, images)

    @property
    def num_compilations(self) -> int:
        size = getattr(self._jit, "_cache_size", None)
        return int(size()) if callable(size) else self.num_traces

    def stacked(self, params: Tree, adapters: Sequence[Tree], images: jax.Array) -> jax.Array:
        """Logits (N, B, C) of N adapters of the same structure on one batch, one vmapped program
        (the base and head are shared; use `__call__` per adapter for per-task heads)."""
        if not adapters:
            raise ValueError("no adapters given")
        try:
            batch = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *adapters)
        except ValueError as e:
            raise ValueError(f"stacked() needs adapters of one structure and shape: {e}") from None
        return self._stacked(params, batch, images)

    def run(self, bank: Any, name: str, images: jax.Array) -> jax.Array:
        """Logits of entry `name` of an `AdapterBank` (its own head if it has one)."""
        entry = bank[name]
        if entry.method != self.method:
            raise ValueError(f"entry {name!r} uses {entry.method!r}, this forward was built for "
                             f"{self.method!r}; build one SwappableForward per method")
        return self(bank.params(name), entry.adapter, images)


def make_forward(model: Any, method: Method) -> SwappableForward:
    """`SwappableForward(model, method)`."""
    return SwappableForward(model, method)
