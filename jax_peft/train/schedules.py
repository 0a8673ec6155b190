"""Learning-rate schedules as functions of the optimizer step (optax schedules).

Two kinds:

* `cosine`: per-step linear warmup from `warmup_lr` to `lr` over `warmup_steps`, then cosine decay to
  `min_lr` at `total_steps` (`optax.warmup_cosine_decay_schedule`).
* `timm_epoch`: the official recipes' per-epoch stepping of timm's `CosineLRScheduler`
  (`t_in_epochs=True`, `warmup_prefix=False`, `cycle_limit=1`), see docs/methods.md §5. The LR is
  constant within an epoch; `lr(step) = LR_used(epoch = step // steps_per_epoch)` with

      f(t) = warmup_lr + t (lr - warmup_lr) / W                 t < W
      f(t) = min_lr + (lr - min_lr) (1 + cos(pi t / T)) / 2     W <= t < T
      f(t) = min_lr                                             t >= T   (the cooldown epochs)

  and `step_offset="after_epoch"` (FacT, EFFT, NOAH, RLRR call `step(e)` after epoch e, so epoch 0
  uses `warmup_lr` and epoch e >= 1 uses f(e - 1)) or `"before_epoch"` (SSF / timm's train script
  call `step(e + 1)`, so epoch e uses f(e)). The per-epoch values are computed in float64 and
  looked up in a float32 table, so they equal the PyTorch values to float32 rounding.
* `constant`: `lr` at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[Any], Any]

STEP_OFFSETS = ("after_epoch", "before_epoch")


def timm_cosine_value(t: float, *, lr: float, warmup_epochs: int, warmup_lr: float, min_lr: float,
                      cosine_epochs: int) -> float:
    """timm's `CosineLRScheduler._get_lr(t)` (epoch-indexed, cycle limit 1), in float64."""
    if t < warmup_epochs:
        return warmup_lr + t * (lr - warmup_lr) / warmup_epochs
    if t >= cosine_epochs:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t / cosine_epochs))


def timm_epoch_lrs(num_epochs: int, *, lr: float, warmup_epochs: int, warmup_lr: float, min_lr: float,
                   cosine_epochs: int, step_offset: str = "after_epoch") -> np.ndarray:
    """The LR used during each epoch 0..num_epochs-1 by the official training scripts (float64)."""
    if step_offset not in STEP_OFFSETS:
        raise ValueError(f"unknown step_offset {step_offset!r}; use one of {STEP_OFFSETS}")
    if cosine_epochs <= 0:
        raise ValueError(f"cosine_epochs must be positive, got {cosine_epochs}")
    kw = dict(lr=lr, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr,
              cosine_epochs=cosine_epochs)
    out = np.empty((num_epochs,), np.float64)
    for e in range(num_epochs):
        if step_offset == "after_epoch":
            # The constructor sets warmup_lr (= f(0) when warmup is on); step(e) runs after epoch e.
            out[e] = timm_cosine_value(e - 1, **kw) if e >= 1 else (warmup_lr if warmup_epochs > 0 else lr)
        else:
            out[e] = timm_cosine_value(e, **kw)
    return out


def timm_epoch_schedule(steps_per_epoch: int, num_epochs: int, **kwargs: Any) -> Schedule:
    """`lr(step) = timm_epoch_lrs(...)[step // steps_per_epoch]` (clamped to the last epoch)."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    table = jnp.asarray(timm_epoch_lrs(max(num_epochs, 1), **kwargs), jnp.float32)

    def schedule(step):
        epoch = jnp.minimum(jnp.asarray(step) // steps_per_epoch, table.shape[0] - 1)
        return table[epoch]

    return schedule


def make_schedule(cfg: Any, *, lr: float, total_steps: int, steps_per_epoch: int) -> Schedule:
    """Builds the schedule described by a config's `schedule` block (see `train/config.py`)."""
    kind = cfg.kind
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "cosine":
        warmup = int(cfg.warmup_steps)
        if total_steps <= warmup:
            raise ValueError(f"total_steps ({total_steps}) must exceed schedule.warmup_steps ({warmup})")
        return optax.warmup_cosine_decay_schedule(
            init_value=float(cfg.warmup_lr) if warmup > 0 else lr, peak_value=lr,
            warmup_steps=warmup, decay_steps=total_steps, end_value=float(cfg.min_lr))
    if kind == "timm_epoch":
        num_epochs = -(-total_steps // steps_per_epoch)
        return timm_epoch_schedule(
            steps_per_epoch, num_epochs, lr=lr, warmup_epochs=int(cfg.warmup_epochs),
            warmup_lr=float(cfg.warmup_lr), min_lr=float(cfg.min_lr),
            cosine_epochs=int(cfg.cosine_epochs), step_offset=cfg.step_offset)
    raise ValueError(f"unknown schedule.kind {kind!r}; use 'cosine', 'timm_epoch' or 'constant'")
