"""The optimizer: optax AdamW or SGD-momentum over the trainable tree, with freezing by leaf path.

The trainable tree during fine-tuning is `{"adapter": adapter, "head": head}`; the frozen base
parameters are not part of it at all (the train step takes them as a separate, non-donated argument,
so no gradient or optimizer state exists for them).

Weight decay follows the method's official recipe through `method.decay_mask(trainable)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax


def build_optimizer(
    cfg: Any,
    schedule: Callable[[Any], Any] | float,
    *,
    decay_mask: Any = None,
) -> optax.GradientTransformation:
    """optax transformation from a config's `optimizer` block.

    Args:
      cfg: `name` ("adamw" | "sgd"), `weight_decay`, `b1`, `b2`, `eps`, `momentum`, `grad_clip_norm`.
      schedule: learning rate (a float or an optax schedule of the step).
      decay_mask: bool tree (or callable) over the trainable tree: leaves that get weight decay.

    AdamW is decoupled (PyTorch `AdamW`: p -= lr * (adam + wd * p)). SGD adds `wd * p` to the
    gradient before momentum (PyTorch `SGD(weight_decay=...)`). Clipping by global norm comes first.
    """
    name = cfg.name
    wd = float(cfg.weight_decay)
    if name == "adamw":
        tx = optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                         weight_decay=wd, mask=decay_mask)
    elif name == "sgd":
        parts = []
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
        mom = float(cfg.momentum)
        parts.append(optax.sgd(schedule, momentum=mom if mom else None))
        tx = optax.chain(*parts)
    else:
        raise ValueError(f"unknown optimizer.name {name!r}; use 'adamw' or 'sgd'")
    clip = float(cfg.grad_clip_norm)
    if clip < 0:
        raise ValueError(f"optimizer.grad_clip_norm must be >= 0 (0 disables clipping), got {clip}")
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx
