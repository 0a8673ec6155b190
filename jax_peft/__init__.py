"""jax_peft: parameter-efficient fine-tuning of Vision Transformers in JAX/Flax.

Public API (see README and docs)::

    params = jax_peft.load_checkpoint("ViT-B_16")          # or a path / https:// / gs:// URL
    cfg = jax_peft.vit_config(params, num_classes=100)
    model = jax_peft.ViT(cfg)
    method = jax_peft.get_method("rlrr")
    adapter = method.init(jax.random.PRNGKey(0), params)
    logits = model.apply({"params": method.apply(params, adapter)}, images, train=False)
    merged = jax_peft.merge(params, method, adapter)
    jax_peft.save_checkpoint("merged.npz", merged)

The top level is this pytree API; the trainer lives in `jax_peft.train` (`train_and_evaluate`,
`evaluate`, `default_config`, `method_config`), datasets in `jax_peft.data`, configs in
`jax_peft.configs`. Names are imported on first use: `import jax_peft` loads no JAX.
"""

import sys
import types
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access, so `import jax_peft` is cheap)
_EXPORTS = {
    "ViT": "jax_peft.vit",
    "ViTConfig": "jax_peft.vit",
    "vit_config": "jax_peft.vit",
    "init_params": "jax_peft.vit",
    "param_shapes": "jax_peft.vit",
    "NAMED_CONFIGS": "jax_peft.vit",
    "Swin": "jax_peft.swin",
    "SwinConfig": "jax_peft.swin",
    "swin_config": "jax_peft.swin",
    "swin": "jax_peft.swin",
    "load_checkpoint": "jax_peft.checkpoint",
    "save_checkpoint": "jax_peft.checkpoint",
    "validate_params": "jax_peft.checkpoint",
    "drop_pre_logits": "jax_peft.checkpoint",
    "reset_head": "jax_peft.checkpoint",
    "resize_pos_embedding": "jax_peft.checkpoint",
    "detect_layout": "jax_peft.checkpoint",
    "CheckpointError": "jax_peft.checkpoint",
    "get_method": "jax_peft.methods.base",
    "method_names": "jax_peft.methods.base",
    "Method": "jax_peft.methods.base",
    "register_method": "jax_peft.methods.base",
    "sites": "jax_peft.sites",
    "from_official": "jax_peft.convert",
    "to_official": "jax_peft.convert",
    "from_hf_peft": "jax_peft.convert",
    "to_hf_peft": "jax_peft.convert",
    "timm_vit": "jax_peft.timm_vit",
    "torch_io": "jax_peft.torch_io",
    "paths": "jax_peft.paths",
    "data": "jax_peft.data",
    "analysis": "jax_peft.analysis",
    "make_dataset": "jax_peft.data",
    "dataset_info": "jax_peft.data",
    "vtab_tasks": "jax_peft.data",
    "SidePath": "jax_peft.vit",
    "activation_form": "jax_peft.methods.activation",
    "supports_activation_form": "jax_peft.methods.activation",
    "stack_blocks": "jax_peft.scan",
    "unstack_blocks": "jax_peft.scan",
    "merge": "jax_peft.merge",
    "train": "jax_peft.train",
}
_MODULES = {"paths", "data", "analysis", "train", "sites", "swin", "timm_vit", "torch_io"}
__all__ = sorted(_EXPORTS) + ["__version__"]


class _Package(types.ModuleType):
    """`jax_peft.merge` is both a submodule and the public function. Importing a submodule binds it
    as an attribute of its package (`setattr(jax_peft, "merge", <module>)`, whoever imports it and
    whenever); this keeps the public name bound to the function instead, so `merge` can stay lazy."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "merge" and isinstance(value, types.ModuleType):
            value = value.merge
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = import_module(_EXPORTS[name])
        value = module if name in _MODULES else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jax_peft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
