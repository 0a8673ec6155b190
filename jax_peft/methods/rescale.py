"""Scale/shift folding shared by RLRR and SSF: exact weight-form rewrites of `y = x ⊙ γ + β` and of
RLRR's row/column rescaling, all computed in float32 and cast back to the parameter's dtype.

Notation: a linear module has kernel K (in, out) in its matrix view (see `layers.matrix_view`) and
bias b (out,) (q/k/v biases are stored (H, hd) and flattened here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jax_peft.methods import layers

F32 = jnp.float32


def _f32(x: Any) -> jnp.ndarray:
    return jnp.asarray(x, F32)


def _like(x: jnp.ndarray, ref: Any) -> jnp.ndarray:
    return x.astype(jnp.result_type(ref)).reshape(jnp.shape(ref))


def rescale_kernel(kernel: Any, module: str, s_in: Any, s_out: Any) -> jnp.ndarray:
    """RLRR: `K' = K + K ⊙ (s_in s_outᵀ)` on the (in, out) matrix view; same shape/dtype as K."""
    k = layers.matrix_view(_f32(kernel), module)
    return _like(k + k * (_f32(s_in)[:, None] * _f32(s_out)[None, :]), kernel)


def shift_bias(bias: Any, f: Any) -> jnp.ndarray:
    """`b' = b + f` with f over the flattened output axis."""
    return _like(layers.vector_view(_f32(bias)) + _f32(f), bias)


def scale_shift_linear(kernel: Any, bias: Any, module: str, gamma: Any, beta: Any) -> tuple:
    """SSF after a linear: `(x K + b) ⊙ γ + β = x (K diag γ) + (b ⊙ γ + β)`."""
    g = _f32(gamma)
    k = layers.matrix_view(_f32(kernel), module) * g[None, :]
    b = layers.vector_view(_f32(bias)) * g + _f32(beta)
    return _like(k, kernel), _like(b, bias)


def scale_shift_affine(scale: Any, bias: Any, gamma: Any, beta: Any) -> tuple:
    """SSF after a LayerNorm: `(n ⊙ s + b) ⊙ γ + β` = LN with scale `s ⊙ γ`, bias `b ⊙ γ + β`."""
    g = _f32(gamma)
    return _like(_f32(scale) * g, scale), _like(_f32(bias) * g + _f32(beta), bias)


def scale_shift_conv(kernel: Any, bias: Any, gamma: Any, beta: Any) -> tuple:
    """SSF on the patch-embedding output (before CLS / position embedding): per output channel,
    kernel (P, P, 3, D) ⊙ γ and bias ⊙ γ + β."""
    g = _f32(gamma)
    return _like(_f32(kernel) * g, kernel), _like(_f32(bias) * g + _f32(beta), bias)


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


def node(tree: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    """Sub-dict of a nested tree at a '/'-joined path."""
    out: Any = tree
    for part in path.split("/"):
        out = out[part]
    return out


# --- selection of adapted locations ------------------------------------------------------------

def select_nodes(nodes: list[str], pattern: str, *, what: str) -> list[str]:
    """The node paths (e.g. `Transformer/encoderblock_0/MlpBlock_0/Dense_0`) that `pattern` matches
    (re.search) either as a node path or through one of its leaf paths (`.../kernel`, `.../bias`,
    `.../scale`), in their original order. Raises (via `paths.select`) when nothing matches."""
    from jax_peft import paths

    expanded = {f"{n}{suffix}": n for n in nodes for suffix in ("", "/kernel", "/bias", "/scale")}
    hits = set(expanded[p] for p in paths.select(list(expanded), pattern, what=what))
    return [n for n in nodes if n in hits]
