"""The training configuration schema (ml_collections), shared by every module in `jax_peft.configs`.

Config files start from `default_config()` and change fields; the schema is locked, so a typo such
as `--config.optimizer.lr_rate=...` fails with the list of valid keys. Shape of the schema:

    model:     name, checkpoint, gelu, image_size, num_classes, drop_path_rate, drop_path_mode,
               dropout_rate, remat, scan; for random init (checkpoint "" or "random") also patch_size,
               hidden_size, num_layers, num_heads, mlp_dim, classifier
    method:    name, and the method's own hyper-parameters (e.g. rank, scale), free-form
    data:      name, data_dir, train_split, eval_split, image_size, interpolation, normalization,
               hflip, random_resized_crop, shuffle_buffer, prefetch, cache, cache_dir, cache_max_gb,
               worker_processes
    optimizer: name (adamw|sgd), lr, weight_decay, b1, b2, eps, momentum, grad_clip_norm
    schedule:  kind (cosine|timm_epoch|constant), warmup_steps, warmup_epochs, warmup_lr, min_lr,
               cosine_epochs, steps_per_epoch, step_offset ("after_epoch" | "before_epoch")
    batch_size, total_steps, num_epochs, seed, label_smoothing, eval_every, log_every,
    checkpoint_every, keep_checkpoints, keep_best, export_merged, parallel (jit|pmap),
    mesh (data, fsdp, rules, min_bytes),
    compute_dtype (float32|bfloat16), train_form (auto|weight|activation), mode (train|eval|export), restore_from (latest|best), progress,
    resume_override
"""

from __future__ import annotations

from typing import Any

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """All keys with their defaults. `method` stays unlocked for per-method hyper-parameters."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dict(
        name="ViT-B/16",          # architecture name, or "" to infer it from the checkpoint
        checkpoint="ViT-B_16",    # short name, path, https:// or gs:// URL (see load_checkpoint)
        gelu="exact",             # "exact" (PEFT papers, PyTorch) or "tanh" (vit_jax)
        image_size=224,
        num_classes=-1,           # -1: taken from the dataset
        drop_path_rate=0.0,
        drop_path_mode="sample",  # "sample" (timm stochastic depth) or "element" (RLRR)
        dropout_rate=0.0,
        remat=False,
        scan=False,               # one lax.scan over the blocks (ViTConfig.scan): compile one block, not L
        # Architecture of a randomly initialized model (checkpoint "" or "random"): -1 = from `name`.
        patch_size=-1,
        hidden_size=-1,
        num_layers=-1,
        num_heads=-1,
        mlp_dim=-1,
        classifier="token",       # "token" | "gap" (random init only; checkpoints decide themselves)
    ))

    c.method = ml_collections.ConfigDict(dict(name="rlrr"))

    c.data = ml_collections.ConfigDict(dict(
        name="vtab/cifar100",     # see jax_peft.data; "synthetic/..." for generated data
        data_dir=ml_collections.FieldReference(None, field_type=str),
        train_split="train800val200",
        eval_split="test",
        image_size=224,
        interpolation="bicubic",  # "bilinear" | "bicubic"
        normalization="minus_one_one",  # "minus_one_one" (= mean/std 0.5) | "imagenet"
        hflip=False,
        random_resized_crop=False,
        shuffle_buffer=10_000,
        drop_remainder=True,      # training: False keeps the last partial batch of each epoch
                                  # (padded + masked, as PyTorch's drop_last=False; RLRR's loader)
        prefetch=2,
        cache=True,               # decoded cache (jax_peft.data.cache): decode + resize each split once
        cache_dir="",             # "": $JAX_PEFT_CACHE_DIR, else <data_dir>/jax_peft_cache, else ~/.cache/jax_peft/decoded
        cache_max_gb=4.0,         # splits whose decoded images would take more are decoded every epoch
        worker_processes=-1,      # decoding processes for what is not cached; -1: auto (cpu count for >= 512 records)
    ))

    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw",             # "adamw" | "sgd"
        lr=1e-3,
        weight_decay=1e-4,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        momentum=0.9,             # sgd only
        grad_clip_norm=0.0,       # 0: off
    ))

    c.schedule = ml_collections.ConfigDict(dict(
        kind="cosine",            # "cosine" (per step) | "timm_epoch" (official per-epoch) | "constant"
        warmup_steps=0,           # cosine
        warmup_epochs=10,         # timm_epoch
        warmup_lr=1e-6,
        min_lr=1e-5,
        cosine_epochs=100,        # timm_epoch: period T; epochs past it stay at min_lr (cooldown)
        steps_per_epoch=-1,       # timm_epoch: -1 = from the dataset size and batch size
        step_offset="after_epoch",  # timm_epoch: "after_epoch" (RLRR/FacT/EFFT) | "before_epoch" (SSF)
    ))

    c.batch_size = 64
    c.total_steps = -1            # -1: num_epochs * steps_per_epoch
    c.num_epochs = 100
    c.seed = 42
    c.label_smoothing = 0.0
    c.eval_every = 150            # steps; 0: only at the end
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.keep_best = True            # also keep the checkpoint with the best eval accuracy
    c.export_merged = False       # write DIR/merged.npz (Google layout) at the end
    c.parallel = "jit"            # "jit" (NamedSharding over a mesh) | "pmap"
    # Device mesh for parallel="jit": the batch is split over data x fsdp; frozen parameters are
    # sharded over fsdp by `rules` ((path regex, "shard" | "replicate"), first match wins; leaves under
    # `min_bytes` replicated). fsdp=1: plain data parallelism. See docs/distributed.md.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, rules=((".*", "shard"),), min_bytes=1 << 18))
    c.compute_dtype = "float32"   # "float32" | "bfloat16" (parameters and optimizer stay float32)
    c.train_form = "auto"         # "auto" (activation form for FacT/EFFT/LoRA) | "weight" | "activation"
    c.mode = "train"              # "train" | "eval" | "export"
    c.restore_from = "latest"     # eval/export modes: "latest" | "best" checkpoint
    c.progress = True             # progress bar on stderr
    c.resume_override = ""        # resuming with other values of these safe fields, e.g. "total_steps,eval_every"
                                  # (jax_peft.train.safety.OVERRIDABLE_ON_RESUME); other fields must match

    c.lock()
    c.method.unlock()
    return c


def method_config(name: str, **hparams: Any) -> ml_collections.ConfigDict:
    """The `method` block for `name` with every hyper-parameter of the method at its default (then
    `hparams`), locked, so command-line overrides such as `--config.method.rank=16` work and typos
    fail with the list of valid keys. Use as `config.method = method_config("lora", rank=4)`.

    Fields whose default is None accept any value from the command line (e.g.
    `--config.method.layers="(0, 1)"`).
    """
    import dataclasses

    from jax_peft.methods.base import get_method

    # validates the names (aliases allowed) and values early; options only a backbone variant has
    # (e.g. EFFT's Swin `mlp_rank`) give that variant's keys
    cls = type(get_method(name, **hparams))
    # Keys are the public option names (e.g. EFFT's `init`, stored in the field `init_scheme`).
    aliases = dict(getattr(cls, "hparam_aliases", {}))
    public = {field: alias for alias, field in aliases.items()}
    values = {public.get(f.name, f.name): f.default for f in dataclasses.fields(cls)}
    for k, v in hparams.items():
        values[public.get(k, k)] = v
    c = ml_collections.ConfigDict({"name": name})
    for k, v in values.items():
        if v is None:
            c[k] = ml_collections.FieldReference(None, field_type=object)
        else:
            c[k] = v
    c.lock()
    return c


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Train batches per epoch: num_examples // batch_size (at least 1) when the last partial batch
    is dropped, the ceiling when it is kept (`data.drop_remainder=False`: padded and masked)."""
    n, b = int(num_examples), int(batch_size)
    return max(1, n // b) if drop_remainder else -(-n // b)


def lock_method(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Replaces a free-form `config.method` block ({"name": ..., some hyper-parameters}) by the full
    locked `method_config`, so every hyper-parameter can be overridden from the command line and
    typos fail. Config files call it last; returns `config`."""
    hp = {k: v for k, v in config.method.to_dict().items() if k != "name"}
    config.method = method_config(config.method.name, **hp)
    return config


def resolve_config(spec: str) -> str:
    """The config file behind a `--config` value: `package.module[:arg]` (e.g.
    `jax_peft.configs.vtab1k:cifar100,rlrr`) becomes `/path/to/module.py[:arg]`; a file path
    (`my_config.py[:arg]`) is returned as given. ValueError names the fix when neither exists."""
    import importlib.util
    import os

    target, sep, arg = spec.partition(":")
    if os.path.isfile(target):
        return spec
    if target.endswith(".py"):
        name = os.path.splitext(os.path.basename(target))[0]
        hint = (f"; the configs moved into the package: use --config jax_peft.configs.{name}{sep}{arg}"
                if importlib.util.find_spec("jax_peft.configs." + name) else "")
        raise ValueError(f"config file {target!r} not found{hint}")
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not found.origin.endswith(".py"):
        import pkgutil

        from jax_peft import configs

        names = ", ".join(f"jax_peft.configs.{m.name}" for m in pkgutil.iter_modules(configs.__path__))
        raise ValueError(f"--config {spec!r}: {target!r} is neither a config file nor an importable module "
                         f"with get_config(); the package's configs: {names}")
    return found.origin + sep + arg
