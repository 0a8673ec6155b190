"""Dropout masks at half the random-bit cost: two 16-bit draws from each 32-bit threefry word.

`jax.random.bernoulli` spends one threefry word (and one float conversion) per element. The masks of
activation dropout (LoRA's input, FacT's rank-r activation, RLRR's element-wise drop path) are as
large as the activations they mask, so on ViT-B/16 their generation is a visible share of a PEFT
step's memory traffic. Here the elements 2j and 2j + 1 of the last axis compare the high and the low
16 bits of word j with `round(keep · 2¹⁶)` (interleaved, so the mask is built inside the consumer's
fusion; XLA's cost analysis of a ViT-B/16 LoRA input mask: 38.7 MB accessed instead of 72.6 MB). The keep probability is therefore `keep` rounded to a multiple of 2⁻¹⁶ (off by at most
7.7e-6; 0.9 becomes 0.899994); kept entries are scaled by 1/keep as in torch.nn.Dropout. Masks are a
pure function of (key, keep, shape) with jax's partitionable threefry, so they are the same under
any sharding of the computation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

_LEVELS = 1 << 16


def keep_mask(key: Array, keep: float | Array, shape: tuple[int, ...]) -> Array:
    """bool `shape`: True with probability `keep` (rounded to a multiple of 2⁻¹⁶) per element.
    `keep` may be traced (the scanned encoder's per-block drop-path rate)."""
    if isinstance(keep, (int, float)) and not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep probability {keep} is outside [0, 1]; a dropout rate must lie in [0, 1)")
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) == 0:
        return jnp.zeros(shape, bool)
    lead, width = (shape[:-1], shape[-1]) if shape else ((), 1)
    words = jax.random.bits(key, lead + ((width + 1) // 2,), jnp.uint32)
    threshold = jnp.round(jnp.asarray(keep, jnp.float32) * _LEVELS).astype(jnp.uint32)
    pairs = jnp.stack([(words >> 16) < threshold, (words & (_LEVELS - 1)) < threshold], axis=-1)
    mask = pairs.reshape(lead + (2 * words.shape[-1],))
    return (mask if mask.shape[-1] == width else mask[..., :width]).reshape(shape)


def inverted_dropout(key: Array, x: Array, rate: float) -> Array:
    """torch.nn.Dropout in training: x (any shape) zeroed with probability `rate`, kept entries ×1/(1 − rate)."""
    if rate == 0.0:
        return x
    keep = 1.0 - rate
    return jnp.where(keep_mask(key, keep, x.shape), x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))
