"""Helpers shared by the factorized low-rank methods (FacT-TT, FacT-TK, EFFT).

* PyTorch-compatible initializers (`torch_linear_uniform`, `xavier_uniform`), so a jax_peft adapter
  starts from the same distributions as the official code.
* `chunked_fc1` / `chunked_fc2`: FacT's block-wise MLP increments (the (D, M) / (M, D) kernel is split
  into M/D square blocks, each its own rank-r product).
* `add_increments`: adds (in, out) increments to the matrix views of the canonical ViT kernels and
  returns a new tree (the input tree is never modified).
* `width_mlp_depth`, `check_rank`, `OfficialDict`: shape reading and error helpers.

All increments are built in (at least) float32 with HIGHEST matmul precision and cast once to the
kernel dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_peft import paths
from jax_peft.methods import layers

HI = jax.lax.Precision.HIGHEST


def f32(x: Any) -> jax.Array:
    """`x` as an array of at least float32 precision (bf16/fp16 -> fp32; fp64 stays fp64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# --- initializers ------------------------------------------------------------------------------
def torch_linear_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """PyTorch `nn.Linear` default weight init: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def xavier_uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`torch.nn.init.xavier_uniform_` with PyTorch's fan convention: fan_in = shape[1]·∏shape[2:],
    fan_out = shape[0]·∏shape[2:], bound √(6/(fan_in + fan_out))."""
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


# --- shapes and validation ---------------------------------------------------------------------
def width_mlp_depth(params: Mapping[str, Any]) -> tuple[int, int, int]:
    """(D, M, L) of a canonical ViT tree; M must be a multiple of D (FacT's square MLP blocks)."""
    depth = layers.num_blocks(params)
    if depth == 0:
        raise ValueError("the parameter tree has no Transformer/encoderblock_{i}; nothing to adapt")
    d, m = layers.in_out(params, 0, "fc1")
    return d, m, depth


def mlp_ratio(width: int, mlp_dim: int, method: str) -> int:
    if mlp_dim % width:
        raise ValueError(f"{method} splits the MLP kernels into square {width}x{width} blocks, but the MLP "
                         f"width {mlp_dim} is not a multiple of the model width {width}")
    return mlp_dim // width


def check_rank(rank: Any, method: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"{method}: rank must be a positive integer, got {rank!r}")


def check_rank_width(rank: int, width: int, method: str) -> None:
    if rank > width:
        raise ValueError(f"{method}: rank {rank} is larger than the model width {width}; "
                         f"use rank <= {width}")


def check_dropout(p: Any, method: str) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{method}: dropout must be a float in [0, 1), got {p!r}")


def check_choice(value: Any, choices: Iterable[str], option: str, method: str) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{method}: unknown {option} {value!r}; choose one of {', '.join(map(repr, choices))}")


# --- increments ------------------------------------------------------------------------------
def mm(*xs: jax.Array) -> jax.Array:
    """Left-to-right matrix chain product in float32, HIGHEST precision."""
    out = f32(xs[0])
    for x in xs[1:]:
        out = jnp.matmul(out, f32(x), precision=HI)
    return out


def chunked_fc1(u: jax.Array, t1: jax.Array, v: jax.Array) -> jax.Array:
    """FacT fc1 increment (D, k·D) from U (D, r), T1 (r, k·r), V (r, D): column block i is
    `U T1[:, i r:(i+1) r] V`. Computed as ((U T1) viewed (D·k, r)) V: two plain matmuls."""
    d, r = u.shape
    k = t1.shape[1] // r
    ut = jnp.matmul(f32(u), f32(t1), precision=HI).reshape(d * k, r)  # row (d, i) = U[d] T1[:, i r:(i+1) r]
    return jnp.matmul(ut, f32(v), precision=HI).reshape(d, k * v.shape[1])


def chunked_fc2(u: jax.Array, t2: jax.Array, v: jax.Array) -> jax.Array:
    """FacT fc2 increment (k·D, D) from U (D, r), T2 (k·r, r), V (r, D): row block i is
    `U T2[i r:(i+1) r, :] V`. Computed as [U T2_i]_i stacked (k·D, r) times V."""
    d, r = u.shape
    k = t2.shape[0] // r
    ut = jnp.einsum("da,iab->idb", f32(u), f32(t2).reshape(k, r, r), precision=HI).reshape(k * d, r)
    return jnp.matmul(ut, f32(v), precision=HI)


def add_increments(params: Mapping[str, Any], deltas: Mapping[tuple[int, str], jax.Array]) -> dict:
    """New tree with `K_view += Δ` for every ((block, module), Δ (in, out)) in `deltas`.

    The kernel is updated through its matrix view (head-major reshape for attention) in float32 and
    cast back to its own dtype (float64 trees stay float64)."""
    updates = {}
    for (i, module), delta in deltas.items():
        path = f"{layers.module_path(i, module)}/kernel"
        kernel = paths.get(params, path)
        view = layers.matrix_view(f32(kernel), module)
        if view.shape != delta.shape:
            raise ValueError(f"increment for {path} has shape {delta.shape}, the kernel's matrix view is "
                             f"{view.shape}; was the adapter built for a different model?")
        updates[path] = (view + delta).reshape(kernel.shape).astype(kernel.dtype)
    return paths.replace(params, updates)


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout (torch.nn.Dropout in training): zero with probability `rate`, scale the
    kept entries by 1/(1 - rate)."""
    if rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# --- official state dicts ---------------------------------------------------------------------
class OfficialDict:
    """Collects problems while reading an official state dict so one error can list them all."""

    def __init__(self, state_dict: Mapping[str, Any], method: str):
        self.sd = {k: np.asarray(v) for k, v in state_dict.items()}
        self.method = method
        self.missing: list[str] = []
        self.bad_shape: list[str] = []
        self.used: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...] | None = None, *, min_shape: tuple[int, ...] | None = None
             ) -> np.ndarray | None:
        """The tensor `name` (float32) if present with the given shape (or every dim >= min_shape)."""
        self.used.add(name)
        if name not in self.sd:
            self.missing.append(f"{name} {shape or min_shape}")
            return None
        x = self.sd[name]
        ok = (x.shape == tuple(shape)) if shape is not None else (
            x.ndim == len(min_shape) and all(a >= b for a, b in zip(x.shape, min_shape)))
        if not ok:
            want = f"{tuple(shape)}" if shape is not None else f"at least {tuple(min_shape)}"
            self.bad_shape.append(f"{name}: got {x.shape}, expected {want}")
            return None
        return x.astype(jax.dtypes.canonicalize_dtype(np.float64))  # float32 unless jax x64 is on

    def finish(self, is_adapter_name, hint: str = "") -> None:
        """Raise one error listing missing, mis-shaped and unknown adapter tensors (if any)."""
        unknown = sorted(k for k in self.sd if k not in self.used and is_adapter_name(k))
        problems = []
        if self.missing:
            problems.append("missing: " + ", ".join(self.missing))
        if self.bad_shape:
            problems.append("wrong shape: " + "; ".join(self.bad_shape))
        if unknown:
            problems.append("unexpected adapter tensors: " + ", ".join(unknown))
        if problems:
            raise ValueError(f"{self.method}: the state dict does not match the official layout for these "
                             f"settings ({'; '.join(problems)}). {hint}".rstrip())


def strip_prefix(state_dict: Mapping[str, Any], marker: str) -> dict[str, Any]:
    """Drop a wrapper prefix such as 'module.' or 'model.' in front of official names that contain
    `marker` (e.g. 'FacT'), so DataParallel / wrapped checkpoints load too."""
    out: dict[str, Any] = {}
    for k, v in state_dict.items():
        key = k
        for prefix in ("module.", "model."):
            while key.startswith(prefix) and marker in key:
                key = key[len(prefix):]
        out[key] = v
    return out
