"""Merging an adapter back into a plain parameter tree (zero inference overhead)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jax_peft.methods.base import Method


def merge(params: Mapping[str, Any], method: Method, adapter: Mapping[str, Any], *,
          spec: Mapping[str, Any] | None = None) -> dict:
    """A plain parameter tree (same structure as `params`, no adapter left) whose eval logits equal
    `model.apply({"params": method.apply(params, adapter)}, ...)`.

    Every leaf is computed and returned in the wider of float32 and its own dtype: float32 trees stay
    float32 (ready for `jax_peft.save_checkpoint`), bfloat16 trees are merged and returned in float32,
    float64 trees (jax x64) stay float64. The adapter must fit `params` and the method's options
    (`jax_peft.methods.base.check_adapter`, one error listing every mismatch); `spec` (the
    `method.spec(params)` recorded with the adapter) additionally refuses other hyper-parameters (e.g.
    LoRA's alpha) and another model whose shapes happen to fit (e.g. patch 8 vs 4 for RLRR / SSF).
    """
    if spec is not None:
        method.check_spec(spec, params)
    wide = lambda t: jax.tree_util.tree_map(_at_least_f32, t)
    merged = jax.jit(lambda p, a: method.apply(p, a))(wide(params), wide(adapter))
    return wide(merged)


def _at_least_f32(x: Any) -> jax.Array:
    """`x` as float32, or float64 when it is float64 and jax's x64 mode is on (bfloat16 -> float32)."""
    dtype = jax.dtypes.canonicalize_dtype(jnp.promote_types(jnp.result_type(x), jnp.float32))
    return jnp.asarray(x, dtype)
