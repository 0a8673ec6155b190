"""Few-shot fine-grained fine-tuning of ViT-B/16 (FacT / NOAH protocol).

    python -m jax_peft.main --config jax_peft.configs.fewshot:food101,16,0,fact_tt \\
        --workdir runs/fewshot/fact_tt/food101_16shot_seed0 --config.data.data_dir=/data/FGFS

Argument "dataset,shots,seed,method": dataset in food101, stanford_cars, oxford_flowers102,
oxford_iiit_pet, fgvc_aircraft; shots in 1, 2, 4, 8, 16; seed in 0, 1, 2 (the training list; results
are averaged over the three seeds); method in rlrr fact_tt fact_tk efft ssf lora bitfit linear full.
With NOAH's list files under data_dir (see `jax_peft.data.fewshot`) the published splits are used;
otherwise the k-shot list is sampled from TFDS with the seed (FGVC-Aircraft needs the files).

Recipe (NOAH's few-shot runs): AdamW, lr 5e-3, weight decay 1e-4, batch 64 (or the whole training set
when it is smaller, e.g. 1-shot Pets = 37 images), 100 epochs, cosine with 10 warm-up epochs (timm
per-epoch schedule; warm-up start 1e-6 and floor 1e-5 as NOAH's VTAB runs, the few-shot values are
not stated); FacT-TT with rank 16 (scale 1, not stated), baselines with width/rank 8; train
random-resized crop 224 (bicubic) + horizontal flip; eval Resize(256) -> CenterCrop(224); ImageNet
mean/std; evaluation every 10 epochs on `test`. Not reproduced: RandAugment rand-m9-mstd0.5-inc1,
random erasing 0.25, mixup 0.8 / cutmix 1.0 and label smoothing 0.1 of NOAH's timm pipeline.

The papers report few-shot results as curves (FacT Figure 3), not tables, so there is no
`PAPER_RESULTS` entry per cell.
"""

from __future__ import annotations

import ml_collections

from jax_peft.configs.recipes import METHODS
from jax_peft.data import fewshot
from jax_peft.train.config import default_config, lock_method

DATASETS = {name: d.num_classes for name, d in fewshot.DATASETS.items()}
SHOTS, SEEDS = fewshot.SHOTS, fewshot.SEEDS


def get_config(arg: str = "food101,16,0,fact_tt") -> ml_collections.ConfigDict:
    """Config for "dataset,shots,seed,method" (e.g. "oxford_iiit_pet,4,1,lora")."""
    parts = [p.strip() for p in (arg or "").split(",")]
    if len(parts) != 4:
        raise ValueError("jax_peft.configs.fewshot expects 'dataset,shots,seed,method' "
                         f"(e.g. 'food101,16,0,fact_tt'), got {arg!r}")
    dataset, shots, seed, method = parts
    dataset = dataset[len("fewshot/"):] if dataset.startswith("fewshot/") else dataset
    if dataset not in DATASETS:
        raise ValueError(f"unknown few-shot dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if not shots.isdigit() or int(shots) not in SHOTS:
        raise ValueError(f"shots must be one of {SHOTS}, got {shots!r}")
    if not seed.isdigit():
        raise ValueError(f"seed must be a non-negative integer (published: {SEEDS}), got {seed!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    k, s, n_cls = int(shots), int(seed), DATASETS[dataset]

    c = default_config()
    c.method = ml_collections.ConfigDict({"name": method})
    if method == "fact_tt":
        c.method.rank, c.method.scale = 16, 1.0
    elif method in ("fact_tk", "efft"):
        c.method.rank = 8
    elif method == "lora":
        c.method.rank, c.method.variant = 8, "fused_qkv"  # NOAH's LoRA
    c.model.checkpoint = "ViT-B_16"
    c.model.num_classes = n_cls
    c.model.drop_path_rate, c.model.drop_path_mode = 0.1, "sample"
    c.data.name = f"fewshot/{dataset}"
    c.data.train_split, c.data.eval_split = f"train_{k}shot_seed{s}", "test"
    c.data.image_size = c.model.image_size = 224
    c.data.interpolation, c.data.normalization = "bicubic", "imagenet"
    c.data.hflip, c.data.random_resized_crop = True, True
    c.optimizer.lr, c.optimizer.weight_decay = 5e-3, 1e-4
    c.batch_size = min(64, k * n_cls)
    c.num_epochs, c.seed = 100, 42
    c.schedule.kind = "timm_epoch"
    c.schedule.warmup_epochs, c.schedule.warmup_lr, c.schedule.min_lr = 10, 1e-6, 1e-5
    c.schedule.cosine_epochs, c.schedule.step_offset = 100, "after_epoch"
    c.eval_every = 10 * max(1, (k * n_cls) // c.batch_size)
    return lock_method(c)
