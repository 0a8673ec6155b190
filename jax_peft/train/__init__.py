"""Training: optimizer and freezing, jitted data-parallel steps, orbax checkpoints, the loop.

    config = jax_peft.train.default_config()
    config.method = jax_peft.train.method_config("lora", rank=8)
    summary = jax_peft.train.train_and_evaluate(config, workdir)
    metrics = jax_peft.train.evaluate(config, workdir, split="test")
"""

from importlib import import_module
from typing import Any

# name -> module that defines it (imported on first access: `import jax_peft.train` loads no JAX)
_EXPORTS = {
    "train_and_evaluate": "jax_peft.train.loop",
    "evaluate": "jax_peft.train.loop",
    "export": "jax_peft.train.loop",
    "default_config": "jax_peft.train.config",
    "method_config": "jax_peft.train.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jax_peft.train' has no attribute {name!r}")
