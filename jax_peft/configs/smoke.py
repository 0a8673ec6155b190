"""Smoke test: a tiny randomly initialized ViT on generated data (synthetic/smoke), CPU in seconds.

    python -m jax_peft.main --config jax_peft.configs.smoke --workdir /tmp/smoke
    python -m jax_peft.main --config jax_peft.configs.smoke:lora --workdir /tmp/smoke --config.total_steps=300

The argument picks the method (default rlrr); its hyper-parameters are all in `config.method`, so
`--config.method.rank=4` (for a method that has a rank) works. Width 32, 2 blocks, 32x32 images of 4 colour classes;
the loss is logged at every step and a checkpoint is written every 25 steps.
"""

from jax_peft.train.config import default_config, method_config


def get_config(arg: str | None = None):
    c = default_config()
    c.model.name = ""
    c.model.checkpoint = "random"
    c.model.patch_size = 8
    c.model.hidden_size = 32
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.mlp_dim = 64
    c.model.image_size = 32

    c.method = method_config(arg or "rlrr")  # every hyper-parameter, overridable from the CLI

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
