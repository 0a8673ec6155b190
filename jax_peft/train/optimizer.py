"""The optimizer: optax AdamW or SGD-momentum over the trainable tree, with freezing by leaf path.

The trainable tree during fine-tuning is `{"adapter": adapter, "head": head}`; the frozen base
parameters are not part of it at all (the train step takes them as a separate, non-donated argument,
so no gradient or optimizer state exists for them). Inside the trainable tree, a label function over
'/'-joined leaf paths can still freeze leaves in place (`optax.partition` with `set_to_zero`; frozen
leaves get no optimizer state), e.g. to train a full parameter tree with only some leaves updated.

Weight decay follows the method's official recipe through `method.decay_mask(trainable)`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import optax

from jax_peft import paths

TRAINABLE, FROZEN = "trainable", "frozen"


def path_labels(tree: Mapping[str, Any], trainable: Callable[[str], bool] | str) -> dict:
    """A label tree over `tree`: "trainable" where `trainable(path)` (or the regex) holds, else "frozen"."""
    if isinstance(trainable, str):
        chosen = set(paths.select(tree, trainable, what="trainable pattern"))
        trainable = chosen.__contains__
    return paths.map_with_path(lambda p, _: TRAINABLE if trainable(p) else FROZEN, tree)


def build_optimizer(
    cfg: Any,
    schedule: Callable[[Any], Any] | float,
    *,
    decay_mask: Any = None,
    labels: Any = None,
) -> optax.GradientTransformation:
    """optax transformation from a config's `optimizer` block.

    Args:
      cfg: `name` ("adamw" | "sgd"), `weight_decay`, `b1`, `b2`, `eps`, `momentum`, `grad_clip_norm`.
      schedule: learning rate (a float or an optax schedule of the step).
      decay_mask: bool tree (or callable) over the trainable tree: leaves that get weight decay.
      labels: optional label tree (or callable params -> labels) of "trainable"/"frozen" over the
        trainable tree; frozen leaves get zero updates and no optimizer state.

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
    if labels is not None:
        tx = optax.partition({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
    return tx


def count_state(opt_state: Any) -> int:
    """Scalars held by an optimizer state (to check that frozen leaves carry none)."""
    return int(sum(getattr(x, "size", 1) for x in jax.tree_util.tree_leaves(opt_state)))
