"""The contract every PEFT method implements, and the registry behind `jax_peft.get_method`.

A method is a frozen dataclass of hyper-parameters with pure functions over pytrees:

    adapter = method.init(rng, params)          # the method's own trainable leaves (nested dict)
    eff     = method.apply(params, adapter)     # effective params, same tree structure as params
    n       = method.num_params(adapter)        # trainable count, head excluded

The trainable set during fine-tuning is `{"adapter": adapter, "head": params["head"]}`; methods that
train base leaves directly (BitFit, full fine-tuning) keep copies of those leaves in the adapter and
`apply` writes them back, so every method trains through the same interface.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jax_peft import paths

Tree = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Method:
    """Base class. Subclasses are frozen dataclasses whose fields are the hyper-parameters."""

    name: ClassVar[str] = "base"
    # Initialization of the classification head when a method starts from a new head
    # ("zeros": vit_jax/RLRR; "torch_linear": PyTorch nn.Linear default, FacT/EFFT;
    #  "trunc_normal": timm, SSF).
    head_init: ClassVar[str] = "zeros"
    # Option names accepted by `get_method` that differ from the field name, because a field
    # cannot be called `init` (it would shadow `Method.init`): e.g. {"init": "init_scheme"}.
    hparam_aliases: ClassVar[Mapping[str, str]] = {}

    # --- to implement -------------------------------------------------------------------------
    def init(self, rng: jax.Array, params: Tree) -> dict:
        raise NotImplementedError

    def apply(self, params: Tree, adapter: Tree, *, rng: jax.Array | None = None) -> dict:
        """Effective parameters. `rng` (optional) enables training-time noise that lives in the
        weights (EFFT's factor dropout); methods without such noise ignore it."""
        raise NotImplementedError

    def summary(self) -> str:
        """One paragraph: what is adapted and how."""
        return f"{self.name}: {self.hparams()}"

    # --- shared behaviour ---------------------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def num_params(self, adapter: Tree) -> int:
        """Trainable parameters of the adapter (the head is not counted)."""
        return paths.count(adapter)

    def trainable_mask(self, params: Tree) -> dict:
        """Bool tree over `params`: leaves trained directly (the head, plus base leaves the method
        copies into its adapter, e.g. BitFit's biases). Everything else is frozen."""
        return paths.mask(params, lambda p: p.startswith("head/"))

    def decay_mask(self, trainable: Tree) -> dict:
        """Bool tree over `{"adapter": ..., "head": ...}`: which leaves get weight decay.
        Default: every trainable leaf (FacT / EFFT official recipes)."""
        return jax.tree_util.tree_map(lambda _: True, trainable)

    def init_head(self, rng: jax.Array, width: int, num_classes: int) -> dict:
        """A fresh head {"kernel": (D, C), "bias": (C,)} with this method's official init."""
        return init_head(rng, width, num_classes, self.head_init)

    def __str__(self) -> str:
        return self.summary()


def init_head(rng: jax.Array, width: int, num_classes: int, kind: str = "zeros") -> dict:
    """Head initializers used by the official recipes (see docs: head (re-)initialization)."""
    if kind == "zeros":
        return {"kernel": jnp.zeros((width, num_classes)), "bias": jnp.zeros((num_classes,))}
    k1, k2 = jax.random.split(rng)
    if kind == "torch_linear":
        bound = 1.0 / math.sqrt(width)
        return {
            "kernel": jax.random.uniform(k1, (width, num_classes), minval=-bound, maxval=bound),
            "bias": jax.random.uniform(k2, (num_classes,), minval=-bound, maxval=bound),
        }
    if kind == "trunc_normal":
        return {
            "kernel": 0.02 * jax.random.truncated_normal(k1, -2.0, 2.0, (width, num_classes)),
            "bias": jnp.zeros((num_classes,)),
        }
    raise ValueError(f"unknown head init {kind!r}; use 'zeros', 'torch_linear' or 'trunc_normal'")


# name -> "module:Class"; modules are imported on first use.
_REGISTRY: dict[str, str] = {
    "rlrr": "jax_peft.methods.rlrr:RLRR",
    "fact_tt": "jax_peft.methods.fact:FacTTT",
    "fact_tk": "jax_peft.methods.fact:FacTTK",
    "efft": "jax_peft.methods.efft:EFFT",
    "ssf": "jax_peft.methods.ssf:SSF",
    "lora": "jax_peft.methods.lora:LoRA",
    "bitfit": "jax_peft.methods.simple:BitFit",
    "linear": "jax_peft.methods.simple:Linear",
    "full": "jax_peft.methods.simple:Full",
}


def method_names() -> list[str]:
    return list(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_method(name: str, **hparams: Any) -> Method:
    """Builds a method by name, e.g. `get_method("fact_tt", rank=8, scale=10.0)`.

    Unknown options raise a TypeError that lists the valid ones with their defaults.
    """
    cls = method_class(name)
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    aliases = dict(cls.hparam_aliases)
    for alias, field in aliases.items():
        if alias in hparams:
            if field in hparams:
                raise TypeError(f"give either {alias!r} or {field!r} for method {name!r}, not both")
            hparams[field] = hparams.pop(alias)
    unknown = sorted(set(hparams) - set(fields))
    if unknown:
        inverse = {f: a for a, f in aliases.items()}
        valid = ", ".join(f"{inverse.get(k, k)}={v!r}" for k, v in fields.items())
        raise TypeError(f"unknown option(s) {unknown} for method {name!r}; valid options: {valid}")
    return cls(**hparams)
