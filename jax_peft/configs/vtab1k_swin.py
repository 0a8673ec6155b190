"""VTAB-1k fine-tuning of a Swin Transformer: the three papers' Swin tables.

Run one cell (argument "task,method" or "task,method,model"):

    python -m jax_peft.main --config jax_peft.configs.vtab1k_swin:cifar100,rlrr --workdir runs/swin/rlrr/cifar100
    python -m jax_peft.main --config jax_peft.configs.vtab1k_swin:dtd,efft,Swin-L --workdir runs/swin/efft_l/dtd

| table | method | models | adapter (as released / as the paper describes) | trainable, no head |
|---|---|---|---|---|
| RLRR Table 5 | rlrr | Swin-B | official Swin variant: fused qkv, proj, fc1, fc2, merging reductions; SSF after norm1/norm2/final norm | 358,144 (paper: 0.41M with head) |
| FacT Table 2 | fact_tt | Swin-B | FacT-TT r = 16 per stage (paper's reading; no Swin code was released) | 135,168 (paper: 0.135M) |
| EFFT Swin table | efft | Swin-T/S/B/L | released stage-shared factors, ranks doubling per stage | T 371,968, S 378,112, B 291,728, L 1,512,448 (paper Swin-B: 0.49M) |

The method names are the ViT ones: on a Swin tree `rlrr`, `fact_tt` and `efft` run their Swin
variants (`docs/swin.md`). Checkpoints: Swin-B and Swin-L the ImageNet-22k releases
(`swin_base_patch4_window7_224_22k`, `swin_large_patch4_window7_224_22k`, the papers' choice), Swin-T
and Swin-S the ImageNet-1k ones (no 22k release exists); 224 px, window 7.

Settings. None of the three papers prints per-task Swin hyper-parameters, so each recipe is the
method's ViT-B/16 VTAB-1k recipe (`jax_peft.configs.vtab1k`: optimizer, schedule, epochs, batch,
drop path, per-task lr / scale) with these documented choices:

- input normalized with ImageNet mean/std (the Swin's pre-training statistics), bicubic resize;
- rlrr: RLRR's ViT per-task lr, weight decay, drop path and flip (RLRR_VTAB);
- fact_tt: rank 16 fixed (the table's "FacT-TT16"), FacT's ViT per-task scale (FACT_TT);
- efft: the released Swin ranks (attention rank, MLP ranks (a, b), doubling per stage): Swin-B
  4, (2, 4) (the released setter); Swin-S and Swin-T 4, (4, 8) (the Swin-S setter; Swin-T has the
  same widths and no setter of its own); Swin-L 8, (8, 16). EFFT's ViT per-task scale (EFFT), factor
  dropout 0.1. `--config.method.mlp_rank="(4, 8)"` on Swin-B gives the paper's 0.49M reading.

Published accuracies: `PAPER_SWIN[method]` holds each table's parameter count as printed; the
per-task Swin accuracies were not available in this repository's sources, so they are None (fill
them from the papers before comparing).
"""

from __future__ import annotations

import ml_collections

from jax_peft.configs import recipes as R
from jax_peft.configs import vtab1k
from jax_peft.data import vtab
from jax_peft.train.config import default_config, lock_method
from jax_peft.train.model_setup import SWIN_CHECKPOINTS, swin_name

METHODS = ("rlrr", "fact_tt", "efft")
MODELS = {"rlrr": ("Swin-B",), "fact_tt": ("Swin-B",), "efft": ("Swin-T", "Swin-S", "Swin-B", "Swin-L")}
# EFFT's released Swin ranks: model -> (attention rank, MLP ranks (a, b)) of stage 0, doubling per stage
EFFT_SWIN_RANKS = {"Swin-T": (4, (4, 8)), "Swin-S": (4, (4, 8)), "Swin-B": (4, (2, 4)), "Swin-L": (8, (8, 16))}
# method -> {"table", "model", "params" as printed, "accuracy": per-task top-1 % (None: not available here)}
PAPER_SWIN = {
    "rlrr": {"table": "RLRR Table 5", "model": "Swin-B", "params": "0.41M with head", "accuracy": None},
    "fact_tt": {"table": "FacT Table 2 (FacT-TT16)", "model": "Swin-B", "params": "0.135M", "accuracy": None},
    "efft": {"table": "EFFT Swin table", "model": "Swin-T/S/B/L", "params": "Swin-B 0.49M", "accuracy": None},
}


def apply_swin_recipe(c: ml_collections.ConfigDict, task: str, method: str, model: str) -> ml_collections.ConfigDict:
    """Fills `c` (a default_config()) with the Swin recipe of `method` on `model` for `task`."""
    vtab1k.apply_recipe(c, task, method)  # the method's ViT recipe: optimizer, schedule, per-task values
    c.model.name, c.model.checkpoint = model, SWIN_CHECKPOINTS[model]
    c.data.normalization, c.data.interpolation = "imagenet", "bicubic"
    if method == "fact_tt":
        c.method.rank = 16
    elif method == "efft":
        rank, mlp = EFFT_SWIN_RANKS[model]
        _, scale, _ = R.EFFT[task]
        c.method = ml_collections.ConfigDict({"name": "efft", "rank": rank, "mlp_rank": mlp, "scale": float(scale)})
    return c


def get_config(arg: str = "cifar100,rlrr") -> ml_collections.ConfigDict:
    """Config for one Swin VTAB-1k cell, "task,method[,model]" (e.g. "cifar100,rlrr", "dtd,efft,Swin-L")."""
    parts = [p.strip() for p in (arg or "").split(",")]
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"jax_peft.configs.vtab1k_swin expects 'task,method[,model]' (e.g. 'cifar100,rlrr' or "
                         f"'dtd,efft,Swin-L'), got {arg!r}")
    task, method = R.canonical_task(parts[0]), R.check_method(parts[1], METHODS)
    model = swin_name(parts[2]) if len(parts) == 3 else "Swin-B"
    if model not in MODELS[method]:
        raise ValueError(f"the {PAPER_SWIN[method]['table']} recipe covers {', '.join(MODELS[method])}, not "
                         f"{parts[2]!r}")
    c = default_config()
    c.data.name = f"vtab/{task}"
    c.data.train_split, c.data.eval_split = "train800val200", "test"
    c.data.image_size = c.model.image_size = 224
    c.model.num_classes = vtab.num_classes(task)
    return lock_method(apply_swin_recipe(c, task, method, model))
