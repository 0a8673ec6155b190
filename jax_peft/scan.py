"""Exact conversion between the canonical per-block tree and the stacked (scan) layout.

Canonical (one subtree per block, as the Google checkpoints)::

    Transformer/encoderblock_{i}/...leaf                  shape S,   i = 0..L-1

Stacked (what `flax.linen.scan` over blocks with `variable_axes={"params": 0}` stores)::

    Transformer/encoderblock/...leaf                      shape (L, *S)

Everything outside the blocks is left as is. The conversion only stacks / indexes arrays, so
`unstack_blocks(stack_blocks(p))` returns the same values bit for bit (and dtypes are kept).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_peft.lazy_npz import LazyArray
from jax_peft.lazy_npz import stack as lazy_stack

STACKED = "encoderblock"
_BLOCK = re.compile(r"encoderblock_(\d+)")


def _block_names(transformer: Mapping[str, Any]) -> list[str]:
    names = [k for k in transformer if _BLOCK.fullmatch(k)]
    idx = sorted(int(_BLOCK.fullmatch(k).group(1)) for k in names)
    if idx != list(range(len(idx))):
        raise ValueError(f"blocks must be numbered 0..L-1 without gaps; got encoderblock_{idx}")
    return [f"encoderblock_{i}" for i in idx]


def _stack(*xs: Any) -> Any:
    """numpy leaves stay numpy (float64 kept without x64), lazily read ones lazy; anything else
    goes through jnp."""
    if any(isinstance(x, LazyArray) for x in xs):
        return lazy_stack(xs)
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.stack(xs)
    return jnp.stack(xs)


def stack_blocks(params: Mapping[str, Any]) -> dict:
    """Canonical tree -> stacked tree: `Transformer/encoderblock_{i}/x` (S) become
    `Transformer/encoderblock/x` (L, *S)."""
    if "Transformer" not in params:
        raise ValueError("not a canonical ViT tree: no 'Transformer' entry")
    tr = params["Transformer"]
    if STACKED in tr:
        raise ValueError("the tree is already stacked (Transformer/encoderblock exists); "
                         "use unstack_blocks to go back")
    names = _block_names(tr)
    if not names:
        raise ValueError("the tree has no Transformer/encoderblock_{i} to stack")
    structs = [jax.tree_util.tree_structure(tr[n]) for n in names]
    for n, s in zip(names, structs):
        if s != structs[0]:
            raise ValueError(f"{n} has a different structure from {names[0]}; blocks must be identical "
                             "to be stacked")
    blocks = [tr[n] for n in names]
    shapes = [[jnp.shape(x) for x in jax.tree_util.tree_leaves(b)] for b in blocks]
    for n, s in zip(names, shapes):
        if s != shapes[0]:
            raise ValueError(f"{n} has leaf shapes different from {names[0]}; blocks must be identical "
                             "to be stacked")
    stacked = jax.tree_util.tree_map(_stack, *blocks)
    rest = {k: v for k, v in tr.items() if k not in names}
    return {**params, "Transformer": {**rest, STACKED: stacked}}


def unstack_blocks(params: Mapping[str, Any]) -> dict:
    """Stacked tree -> canonical tree (the inverse of `stack_blocks`)."""
    tr = params.get("Transformer") if isinstance(params, Mapping) else None
    if tr is None or STACKED not in tr:
        raise ValueError("not a stacked tree: no 'Transformer/encoderblock' entry (stack_blocks makes one)")
    if any(_BLOCK.fullmatch(k) for k in tr):
        raise ValueError("the tree has both Transformer/encoderblock and encoderblock_{i}; cannot unstack")
    stacked = tr[STACKED]
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree_util.tree_leaves(stacked)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"stacked leaves must share one leading (depth) axis; got leading sizes {sizes}")
    depth = sizes.pop()
    rest = {k: v for k, v in tr.items() if k != STACKED}
    blocks = {f"encoderblock_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(depth)}
    return {**params, "Transformer": {**rest, **blocks}}
