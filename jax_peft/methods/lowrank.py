"""Helpers shared by the factorized low-rank methods (FacT-TT, FacT-TK, EFFT).

* PyTorch-compatible initializers (`torch_linear_uniform`, `xavier_uniform`), so a jax_peft adapter
  starts from the same distributions as the official code.
* `width_mlp_depth`, `blocks_of`, `check_rank_width`, `OfficialDict`: shape reading (through the
  backbone's sites) and error helpers; `dropout` for noise on factor entries (EFFT).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_peft.dropout import inverted_dropout
from jax_peft.sites import Site
from jax_peft.sites import sites as sites_of


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
def blocks_of(params: Mapping[str, Any]) -> dict[int, dict[str, Site]]:
    """{block: {kind: Site}} over the backbone's sites that belong to a block."""
    out: dict[int, dict[str, Site]] = {}
    for s in sites_of(params).values():
        if s.block is not None:
            out.setdefault(s.block, {}).setdefault(s.kind, s)
    return out


def width_mlp_depth(params: Mapping[str, Any]) -> tuple[int, int, int]:
    """(D, M, L) of a tree from its first block's fc1 site (D -> M)."""
    blocks = blocks_of(params)
    if not blocks or "fc1" not in blocks[min(blocks)]:
        raise ValueError("the parameter tree has no blocks with an MLP (fc1) site; nothing to adapt")
    d, m = blocks[min(blocks)]["fc1"].shape
    return d, m, len(blocks)


def mlp_ratio(width: int, mlp_dim: int, method: str) -> int:
    if mlp_dim % width:
        raise ValueError(f"{method} splits the MLP kernels into square {width}x{width} blocks, but the MLP "
                         f"width {mlp_dim} is not a multiple of the model width {width}")
    return mlp_dim // width


def check_rank_width(rank: int, width: int, method: str) -> None:
    if rank > width:
        raise ValueError(f"{method}: rank {rank} is larger than the model width {width}; "
                         f"use rank <= {width}")


def need_params(params: Any, method: str) -> Any:
    """`params` for `from_official`, which reads depth and widths from them."""
    if params is None:
        raise ValueError(f"{method}.from_official needs params= (the ViT tree) to know depth and widths")
    return params


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout (torch.nn.Dropout in training): zero with probability `rate`, scale the
    kept entries by 1/(1 - rate); masks from `jax_peft.dropout` (16-bit draws)."""
    return inverted_dropout(key, x, rate)


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


def official_dict(state_dict: Mapping[str, Any], marker: str, method: str) -> OfficialDict:
    """An `OfficialDict` over `state_dict` with wrapper prefixes dropped (`strip_prefix`)."""
    return OfficialDict(strip_prefix(state_dict, marker), method)


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
