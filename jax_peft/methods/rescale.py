"""Initializers shared by the scale/shift methods (RLRR, SSF, and LoRA's kaiming-uniform A)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

F32 = jnp.float32


def ssf_init(rng: jax.Array, dim: int, identity: bool) -> dict:
    """SSF parameters {"scale": γ (dim,), "shift": β (dim,)}: official γ ~ N(1, .02²), β ~ N(0, .02²);
    identity γ = 1, β = 0."""
    if identity:
        return {"scale": jnp.ones((dim,), F32), "shift": jnp.zeros((dim,), F32)}
    k1, k2 = jax.random.split(rng)
    return {"scale": 1.0 + 0.02 * jax.random.normal(k1, (dim,), F32),
            "shift": 0.02 * jax.random.normal(k2, (dim,), F32)}


def kaiming_uniform(rng: jax.Array, shape: tuple[int, ...], fan_in: int, a: float = 0.0) -> jnp.ndarray:
    """PyTorch `kaiming_uniform_(a=a)`: U(±gain·√(3/fan_in)), gain = √(2/(1+a²))."""
    bound = math.sqrt(2.0 / (1.0 + a * a)) * math.sqrt(3.0 / fan_in)
    return jax.random.uniform(rng, shape, F32, -bound, bound)
