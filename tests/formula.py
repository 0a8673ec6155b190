"""The golden 'formula checkpoint' (tests/data/README.md): every array generated from its key name.

    value[n] = offset + amp * (2 u[n] - 1),  u[n] = (splitmix64(crc32(key) << 32 | n) >> 11) * 2^-53
"""

from __future__ import annotations

import zlib

import numpy as np

WIDTH, HEADS, HEAD_DIM, MLP, PATCH, IMAGE, CLASSES = 768, 12, 64, 3072, 16, 32, 10


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def formula_array(key: str, shape: tuple[int, ...], amp: float, offset: float = 0.0) -> np.ndarray:
    size = int(np.prod(shape))
    salt = np.uint64(zlib.crc32(key.encode("utf-8")) & 0xFFFFFFFF) << np.uint64(32)
    n = np.arange(size, dtype=np.uint64)
    u = (_splitmix64(salt | n) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return (offset + amp * (2.0 * u - 1.0)).astype(np.float32).reshape(shape)


def formula_checkpoint(depth: int) -> dict[str, np.ndarray]:
    """Flat {pre-Linen key: float32 array}, exactly as the Google .npz files store them."""
    d, h, hd, m = WIDTH, HEADS, HEAD_DIM, MLP
    spec: dict[str, tuple[tuple[int, ...], float, float]] = {
        "cls": ((1, 1, d), 0.8, 0.0),
        "embedding/kernel": ((PATCH, PATCH, 3, d), 0.08, 0.0),
        "embedding/bias": ((d,), 0.03, 0.0),
        "Transformer/posembed_input/pos_embedding": ((1, (IMAGE // PATCH) ** 2 + 1, d), 0.8, 0.0),
        "Transformer/encoder_norm/scale": ((d,), 0.15, 1.0),
        "Transformer/encoder_norm/bias": ((d,), 0.15, 0.0),
        "head/kernel": ((d, CLASSES), 0.15, 0.0),
        "head/bias": ((CLASSES,), 0.15, 0.0),
    }
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            spec[f"{b}/{ln}/scale"] = ((d,), 0.15, 1.0)
            spec[f"{b}/{ln}/bias"] = ((d,), 0.15, 0.0)
        a = f"{b}/MultiHeadDotProductAttention_1"
        for qkv in ("query", "key", "value"):
            spec[f"{a}/{qkv}/kernel"] = ((d, h, hd), 0.08, 0.0)
            spec[f"{a}/{qkv}/bias"] = ((h, hd), 0.08, 0.0)
        spec[f"{a}/out/kernel"] = ((h, hd, d), 0.08, 0.0)
        spec[f"{a}/out/bias"] = ((d,), 0.08, 0.0)
        spec[f"{b}/MlpBlock_3/Dense_0/kernel"] = ((d, m), 0.08, 0.0)
        spec[f"{b}/MlpBlock_3/Dense_0/bias"] = ((m,), 0.08, 0.0)
        spec[f"{b}/MlpBlock_3/Dense_1/kernel"] = ((m, d), 0.08, 0.0)
        spec[f"{b}/MlpBlock_3/Dense_1/bias"] = ((d,), 0.08, 0.0)
    return {k: formula_array(k, s, a, o) for k, (s, a, o) in spec.items()}


def formula_input() -> tuple[np.ndarray, np.ndarray]:
    x = formula_array("input/x", (4, IMAGE, IMAGE, 3), 1.0)
    return x, np.array([0, 3, 6, 9], dtype=np.int32)


_LINEN = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
          "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}


def formula_params(depth: int) -> dict:
    """The formula checkpoint as a canonical (Linen-named) nested tree of float32 numpy arrays."""
    tree: dict = {}
    for key, value in formula_checkpoint(depth).items():
        parts = [_LINEN.get(p, p) for p in key.split("/")]
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree
