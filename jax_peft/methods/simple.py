"""Methods that train base leaves directly: BitFit (biases), linear probing (head only), full FT.

They follow the common contract: the adapter holds *copies* of the trained base leaves (nothing for
linear probing) and their edits (`Replace`) write them back, so every method trains `{"adapter", "head"}`.
Weight decay follows VPT's optimizer (the source of the Full / Linear / Bias table numbers): leaves
named `bias` get no decay, everything else trainable does.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jax_peft import paths
from jax_peft.methods.base import Method, Tree, check_regexes
from jax_peft.methods.edits import Replace

# Leaves never copied into an adapter: the classifier is trained separately as `head`.
_HEAD = re.compile(r"^head/")
# VPT "tinytl-bias": every *encoder* parameter whose name contains "bias" (pre_logits is not encoder).
BITFIT_TARGETS = r"^(embedding|Transformer|patch_embed|layers_\d+|norm)/.*bias$"  # ViT and Swin trees


def path_mask(tree: Tree, pred: Callable[[str, Any], bool]) -> Any:
    """Bool tree with `tree`'s exact structure (empty dicts kept), `pred(path, leaf)` per leaf."""

    def key_str(k: Any) -> str:
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))

    return jax.tree_util.tree_map_with_path(
        lambda kp, x: bool(pred("/".join(key_str(k) for k in kp), x)), tree
    )


def not_bias(path: str, leaf: Any) -> bool:
    """VPT / NOAH decay rule: decay everything except biases."""
    return not path.endswith("bias")


def _copy_leaves(params: Tree, selected: list[str]) -> dict:
    flat = paths.flatten(params)
    return paths.unflatten({p: jnp.array(flat[p]) for p in selected})


def _replace_all(adapter: Tree) -> dict[str, Replace]:
    """A `Replace` edit per adapter leaf: the adapter mirrors the parameter paths it trains."""
    return {p: Replace(v) for p, v in paths.flatten(adapter).items()}


@dataclasses.dataclass(frozen=True)
class BitFit(Method):
    """Train every bias vector (VPT's "tinytl-bias", the "Bias" rows): patch-embedding bias,
    q/k/v/o and fc1/fc2 biases, LN1/LN2 shifts of every block and the final-LN shift.

    `targets`: regex(es) (re.search over '/'-joined paths, head excluded) choosing the leaves;
    the default selects all encoder biases. Count `L(7D + M) + 2D` (ViT-B/16: 102,912).
    """

    targets: str | tuple[str, ...] = BITFIT_TARGETS
    name: ClassVar[str] = "bitfit"
    head_init: ClassVar[str] = "zeros"
    edit_kinds: ClassVar[tuple[type, ...]] = (Replace,)

    def __post_init__(self):
        pats = check_regexes(self.targets, "targets", self.name)
        if not isinstance(self.targets, str):
            object.__setattr__(self, "targets", pats)

    def selected(self, params: Tree) -> list[str]:
        body = [p for p in paths.leaf_paths(params) if not _HEAD.search(p)]
        return paths.select(body, self.targets, what="bitfit target")

    def init(self, rng: jax.Array, params: Tree) -> dict:
        """Copies of the selected bias leaves, e.g. `{"embedding": {"bias": (D,)}, ...}`."""
        return _copy_leaves(params, self.selected(params))

    def edits(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict[str, Replace]:
        return _replace_all(adapter)

    def trainable_mask(self, params: Tree) -> dict:
        keep = set(self.selected(params))
        return paths.mask(params, lambda p: p in keep or bool(_HEAD.search(p)))

    def decay_mask(self, trainable: Tree) -> Any:
        return path_mask(trainable, not_bias)

    def summary(self) -> str:
        pats = self.targets if isinstance(self.targets, str) else ", ".join(self.targets)
        return (f"bitfit: trains copies of the base leaves matching {pats!r} (default: every encoder "
                "bias: patch embedding, q/k/v/o, fc1/fc2, LN1/LN2 shifts, final-LN shift) plus the head; "
                "count L(7D + M) + 2D (ViT-B/16: 102,912). Identity at init; no decay on biases.")


@dataclasses.dataclass(frozen=True)
class Linear(Method):
    """Linear probing: the backbone is frozen, only the head trains. The adapter is `{}`."""

    name: ClassVar[str] = "linear"
    head_init: ClassVar[str] = "zeros"

    def init(self, rng: jax.Array, params: Tree) -> dict:
        return {}

    def edits(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict:
        return {}

    def decay_mask(self, trainable: Tree) -> Any:
        return path_mask(trainable, not_bias)

    def summary(self) -> str:
        return "linear: linear probe; only the head (D·C + C) trains, the backbone is frozen; count 0."


@dataclasses.dataclass(frozen=True)
class Full(Method):
    """Full fine-tuning: the adapter is a copy of every non-head leaf (cls, embeddings, all blocks,
    final norm, pre_logits if present). Count = backbone size (ViT-B/16: 85,798,656)."""

    name: ClassVar[str] = "full"
    head_init: ClassVar[str] = "zeros"
    edit_kinds: ClassVar[tuple[type, ...]] = (Replace,)

    def init(self, rng: jax.Array, params: Tree) -> dict:
        return _copy_leaves(params, [p for p in paths.leaf_paths(params) if not _HEAD.search(p)])

    def edits(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict[str, Replace]:
        return _replace_all(adapter)

    def trainable_mask(self, params: Tree) -> dict:
        return paths.mask(params, lambda p: True)

    def decay_mask(self, trainable: Tree) -> Any:
        return path_mask(trainable, not_bias)

    def summary(self) -> str:
        return ("full: every parameter trains (adapter = copy of all non-head leaves, plus the head); "
                "count = backbone size (ViT-B/16: 85,798,656). No decay on biases (VPT).")
