"""Merging an adapter back into a plain parameter tree (zero inference overhead)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jax_peft.methods.base import Method


def merge(params: Mapping[str, Any], method: Method, adapter: Mapping[str, Any]) -> dict:
    """A plain parameter tree (same structure as `params`, no adapter leaves) whose eval logits
    equal `model.apply({"params": method.apply(params, adapter)}, ...)`.

    The merge is computed in float32 whatever the dtypes of `params` and `adapter`, and the result
    is float32, ready for `jax_peft.save_checkpoint`.
    """
    f32 = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), t)
    merged = jax.jit(lambda p, a: method.apply(p, a))(f32(params), f32(adapter))
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), merged)
