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

    The merge is computed in at least float32 whatever the dtypes of `params` and `adapter`, and the
    result is float32 (float64 stays float64 under `jax_enable_x64`), ready for
    `jax_peft.save_checkpoint`.
    """
    wide = lambda t: jax.tree_util.tree_map(_at_least_f32, t)
    merged = jax.jit(lambda p, a: method.apply(p, a))(wide(params), wide(adapter))
    return wide(merged)


def _at_least_f32(x: Any) -> jax.Array:
    """`x` as float32, or float64 when it is float64 and jax's x64 mode is on (bfloat16 -> float32)."""
    dtype = jax.dtypes.canonicalize_dtype(jnp.promote_types(jnp.result_type(x), jnp.float32))
    return jnp.asarray(x, dtype)
