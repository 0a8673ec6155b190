"""Smoke test: a tiny randomly initialized ViT (or Swin) on generated data (synthetic/smoke), CPU in seconds.

    python -m jax_peft.main --config jax_peft.configs.smoke --workdir /tmp/smoke
    python -m jax_peft.main --config jax_peft.configs.smoke:lora --workdir /tmp/smoke --config.total_steps=300
    python -m jax_peft.main --config jax_peft.configs.smoke:swin,efft --workdir /tmp/smoke_swin

The argument picks the method (default rlrr), optionally after `swin,`; its hyper-parameters are all
in `config.method`, so `--config.method.rank=4` (for a method that has a rank) works. ViT: width 32,
2 blocks. Swin: a generated checkpoint (`smoke_swin_checkpoint`: width 16, two stages of 2 blocks,
window 4, random weights) loaded like a released one. 32x32 images of 4 colour classes; the loss is
logged at every step and a checkpoint is written every 25 steps.
"""

import os
import tempfile

from jax_peft.train.config import default_config, method_config

SWIN_SMOKE = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, image_size=32, num_classes=4)


def smoke_swin_checkpoint(directory: str | None = None, depths: tuple[int, ...] = SWIN_SMOKE["depths"]) -> str:
    """Path of the smoke Swin's checkpoint (`SWIN_SMOKE` with these stage depths, seeded random
    weights, timm's layout), written atomically on first use into `directory` (default: the system's
    temporary directory)."""
    import numpy as np

    from jax_peft import paths, swin, swin_checkpoint

    name = f"jax_peft_smoke_swin_v1_d{'-'.join(map(str, depths))}.safetensors"
    path = os.path.join(directory or tempfile.gettempdir(), name)
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        arch = {**SWIN_SMOKE, "depths": tuple(depths), "num_heads": SWIN_SMOKE["num_heads"][:len(depths)]}
        shapes = paths.flatten(swin.param_shapes(swin.swin_config(None, **arch)))
        params = {k: (np.ones(v.shape) + 0.02 * rng.normal(size=v.shape) if k.endswith("norm/scale") or
                      k.endswith(("norm1/scale", "norm2/scale")) else 0.1 * rng.normal(size=v.shape)).astype(np.float32)
                  for k, v in shapes.items()}
        swin_checkpoint.save(path, paths.unflatten(params))
    return path


def get_config(arg: str | None = None):
    parts = (arg or "").split(",")
    is_swin = parts[0] == "swin"
    method = (parts[1:] if is_swin else parts)[:1] or [""]
    c = default_config()
    c.model.name = ""
    c.model.checkpoint = smoke_swin_checkpoint() if is_swin else "random"
    if not is_swin:
        c.model.patch_size = 8
        c.model.hidden_size = 32
        c.model.num_layers = 2
        c.model.num_heads = 2
        c.model.mlp_dim = 64
    c.model.image_size = 32

    c.method = method_config(method[0] or "rlrr")  # every hyper-parameter, overridable from the CLI

    c.data.name = "synthetic/smoke"
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.image_size = 32

    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-2
    c.optimizer.weight_decay = 1e-4
    c.schedule.kind = "cosine"
    c.schedule.warmup_steps = 10
    c.schedule.warmup_lr = 0.0
    c.schedule.min_lr = 1e-4

    c.batch_size = 32
    c.total_steps = 200
    c.seed = 0
    c.log_every = 1
    c.eval_every = 50
    c.checkpoint_every = 25
    c.keep_checkpoints = 3
    return c
