"""Where the adaptable linear layers of a canonical ViT tree live, and their matrix views.

Every adapted linear is viewed as a 2-D kernel K (in, out) with `y = x K + b`. The attention kernels
are stored head-major: query/key/value (D, H, hd) and out (H, hd, D); their (D, D) matrix views are
plain reshapes, so a (D, D) increment applies by reshaping it back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

# short name -> path of the module inside `Transformer/encoderblock_{i}`
MODULES: dict[str, str] = {
    "q": "MultiHeadDotProductAttention_0/query",
    "k": "MultiHeadDotProductAttention_0/key",
    "v": "MultiHeadDotProductAttention_0/value",
    "o": "MultiHeadDotProductAttention_0/out",
    "fc1": "MlpBlock_0/Dense_0",
    "fc2": "MlpBlock_0/Dense_1",
}
ATTENTION = ("q", "k", "v", "o")
MLP = ("fc1", "fc2")
LN1, LN2 = "LayerNorm_0", "LayerNorm_1"


def num_blocks(params: Mapping[str, Any]) -> int:
    """Depth of a canonical tree (number of `Transformer/encoderblock_{i}`)."""
    try:
        names = [k for k in params["Transformer"] if re.fullmatch(r"encoderblock_\d+", k)]
    except KeyError:
        raise ValueError("not a canonical ViT tree: no 'Transformer' entry") from None
    return len(names)


def block_path(i: int) -> str:
    return f"Transformer/encoderblock_{i}"


def module_path(i: int, module: str) -> str:
    return f"{block_path(i)}/{MODULES[module]}"


def matrix_view(kernel: jnp.ndarray, module: str) -> jnp.ndarray:
    """Unambiguous matrix view using the module name (q/k/v: out axes flattened; o: in axes)."""
    if module in ("q", "k", "v"):
        return kernel.reshape(kernel.shape[0], -1)
    if module == "o":
        return kernel.reshape(-1, kernel.shape[-1])
    return kernel


def vector_view(bias: jnp.ndarray) -> jnp.ndarray:
    """Bias (H, hd) or (D,) as a flat vector."""
    return bias.reshape(-1)


def in_out(params: Mapping[str, Any], i: int, module: str) -> tuple[int, int]:
    """(fan_in, fan_out) of the matrix view of block i's `module`."""
    node = params["Transformer"][f"encoderblock_{i}"]
    for part in MODULES[module].split("/"):
        node = node[part]
    m = matrix_view(node["kernel"], module)
    return int(m.shape[0]), int(m.shape[1])
