"""Import and export of adapters in the official PyTorch layouts (names and shapes in
the repository's tests/data/README.md). Each method class with an official layout implements `from_official(state_dict, params)` and
`to_official(tree)`; these functions dispatch by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jax_peft.methods.base import get_method, method_class, method_names


def official_methods() -> tuple[str, ...]:
    """The methods with an official layout (`Method.has_official_layout`)."""
    return tuple(n for n in method_names() if method_class(n).has_official_layout())


def _check(name: str) -> None:
    if not method_class(name).has_official_layout():
        raise ValueError(f"no official layout for method {name!r}; conversion supports "
                         f"{', '.join(official_methods())}")


def from_official(name: str, state_dict: Mapping[str, Any], params: Mapping[str, Any] | None = None,
                  **hparams: Any) -> dict:
    """Adapter tree from an official PyTorch state dict (flat {name: array}; torch tensors are
    accepted). Names that are not the method's adapter tensors (backbone weights, `head.*`, an
    optimizer prefix) are ignored; missing or mis-shaped adapter tensors raise one error listing all."""
    _check(name)  # on a Swin tree, "rlrr" / "efft" run their Swin variants (Method.on)
    sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()}
    return get_method(name, **hparams).from_official(sd, params)


def to_official(name: str, adapter_or_grads: Mapping[str, Any], **hparams: Any) -> dict[str, np.ndarray]:
    """Flat {official name: numpy array} in the official layout. Works on adapters and on gradient
    pytrees of adapters alike (the maps are linear re-layouts)."""
    _check(name)  # a Swin adapter (or its gradient) is exported by the method's Swin variant
    return get_method(name, **hparams).to_official(adapter_or_grads)


def from_hf_peft(dir_or_files: Any, params: Mapping[str, Any] | None = None) -> Any:
    """An HF PEFT LoRA adapter of a timm ViT (`adapter_config.json` + `adapter_model.safetensors`)
    as `(method, adapter, head)`; see `jax_peft.hf_peft`."""
    from jax_peft import hf_peft

    return hf_peft.from_hf_peft(dir_or_files, params)


def to_hf_peft(method: Any, adapter: Mapping[str, Any], out_dir: Any, **kw: Any) -> Any:
    """Writes a LoRA adapter as an HF PEFT adapter directory for a timm ViT; see `jax_peft.hf_peft`."""
    from jax_peft import hf_peft

    return hf_peft.to_hf_peft(method, adapter, out_dir, **kw)
