"""Per-method, per-dataset recipe tables and the papers' published numbers (ViT-B/16).

Shared by `jax_peft.configs.vtab1k`, `.fgvc`, `.fewshot` and `scripts/vtab_sweep.py`.
Sources: each method's released code and paper (docs/methods.md). Task keys are jax_peft's VTAB
short names; the task list, groups and aliases are `jax_peft.data.vtab`'s.
"""

from __future__ import annotations

from jax_peft.data import vtab

VTAB_TASKS = vtab.TASKS
VTAB_GROUPS = {group.capitalize(): tasks for group, tasks in vtab.GROUPS.items()}
METHODS = ("rlrr", "fact_tt", "fact_tk", "efft", "ssf", "lora", "bitfit", "linear", "full")

# --- RLRR (methods.md 6.1): lr, weight decay, drop_path (element-wise), horizontal flip -------------
RLRR_VTAB = {
    "caltech101": (1e-3, 5e-5, 0.1, False), "cifar100": (3e-3, 5e-5, 0.1, False),
    "dtd": (2e-3, 5e-5, 0.1, True), "oxford_flowers102": (3e-3, 5e-2, 0.3, False),
    "oxford_iiit_pet": (1e-3, 5e-5, 0.1, True), "svhn": (5e-3, 5e-5, 0.3, False),
    "sun397": (1e-3, 5e-5, 0.1, False), "patch_camelyon": (3e-3, 5e-2, 0.3, True),
    "eurosat": (1e-3, 5e-5, 0.1, True), "resisc45": (3e-3, 5e-5, 0.0, False),
    "diabetic_retinopathy": (5e-3, 5e-5, 0.1, True), "clevr_count": (5e-3, 5e-5, 0.5, True),
    "clevr_dist": (1e-2, 5e-5, 0.2, True), "dmlab": (5e-3, 5e-5, 0.3, True),
    "kitti": (3e-3, 5e-2, 0.3, True), "dsprites_loc": (1e-2, 5e-5, 0.1, False),
    "dsprites_ori": (5e-3, 5e-5, 0.1, False), "smallnorb_azi": (5e-3, 5e-2, 0.3, False),
    "smallnorb_ele": (1e-3, 5e-5, 0.3, True),
}
# RLRR FGVC (batch 32, wd 5e-2, 50 + 10 epochs): lr, drop_path
RLRR_FGVC = {"cub200": (3e-3, 0.1), "nabirds": (5e-4, 0.3), "oxford_flowers": (3e-3, 0.2),
             "stanford_cars": (3e-3, 0.2), "stanford_dogs": (1e-4, 0.0)}

# --- FacT (methods.md 6.2): (rank, scale) of the "TT <=16" / "TK <=32" rows ------------------------
FACT_TT = {
    "cifar100": (8, 1), "caltech101": (16, 10), "dtd": (8, 0.01), "oxford_flowers102": (16, 1),
    "oxford_iiit_pet": (8, 1), "svhn": (16, 100), "sun397": (8, 1), "patch_camelyon": (8, 10),
    "eurosat": (8, 100), "resisc45": (8, 0.1), "diabetic_retinopathy": (8, 1),
    "clevr_count": (16, 1), "clevr_dist": (4, 10), "dmlab": (16, 10), "kitti": (16, 10),
    "dsprites_loc": (16, 100), "dsprites_ori": (16, 1), "smallnorb_azi": (16, 100),
    "smallnorb_ele": (8, 10),
}
FACT_TK = {
    "cifar100": (32, 0.1), "caltech101": (32, 10), "dtd": (16, 0.01), "oxford_flowers102": (32, 1),
    "oxford_iiit_pet": (16, 10), "svhn": (32, 100), "sun397": (16, 1), "patch_camelyon": (32, 10),
    "eurosat": (32, 100), "resisc45": (32, 10), "diabetic_retinopathy": (16, 1),
    "clevr_count": (32, 10), "clevr_dist": (16, 10), "dmlab": (32, 10), "kitti": (32, 10),
    "dsprites_loc": (32, 100), "dsprites_ori": (32, 1), "smallnorb_azi": (32, 100),
    "smallnorb_ele": (16, 10),
}

# --- EFFT (methods.md 6.3, released EFFT2): rank, scale, init -------------------------------------
EFFT = {
    "cifar100": (16, 1, "vv"), "caltech101": (32, 1, "vv"), "dtd": (8, 0.01, "vv"),
    "oxford_flowers102": (16, 10, "vv"), "oxford_iiit_pet": (16, 1, "vv"), "svhn": (32, 80, "vu"),
    "sun397": (16, 0.5, "vv"), "patch_camelyon": (32, 10, "vv"), "eurosat": (16, 100, "vv"),
    "resisc45": (16, 10, "vv"), "diabetic_retinopathy": (8, 1, "vv"), "clevr_count": (32, 5, "vu"),
    "clevr_dist": (32, 0.05, "vu"), "dmlab": (32, 10, "vu"), "kitti": (16, 10, "vv"),
    "dsprites_loc": (32, 30, "vv"), "dsprites_ori": (16, 10, "vu"), "smallnorb_azi": (32, 50, "vu"),
    "smallnorb_ele": (16, 10, "vu"),
}

# --- SSF (methods.md 6.4): lr, weight decay, drop_path (per-sample stochastic depth) --------------
SSF_VTAB = {
    "cifar100": (5e-3, 5e-5, 0.0), "caltech101": (1e-3, 5e-2, 0.1), "dtd": (5e-3, 5e-5, 0.0),
    "oxford_flowers102": (5e-3, 5e-5, 0.0), "oxford_iiit_pet": (5e-3, 5e-5, 0.0),
    "svhn": (1e-2, 5e-5, 0.0), "sun397": (5e-3, 5e-5, 0.0), "patch_camelyon": (5e-3, 5e-5, 0.0),
    "eurosat": (3e-3, 5e-2, 0.2), "resisc45": (2e-3, 5e-5, 0.1),
    "diabetic_retinopathy": (5e-3, 5e-5, 0.2), "clevr_count": (2e-3, 5e-2, 0.1),
    "clevr_dist": (5e-2, 5e-2, 0.1), "dmlab": (5e-3, 5e-5, 0.1), "kitti": (1e-2, 5e-5, 0.0),
    "dsprites_loc": (1e-2, 5e-5, 0.0), "dsprites_ori": (5e-3, 5e-5, 0.2),
    "smallnorb_azi": (2e-2, 5e-5, 0.1), "smallnorb_ele": (5e-3, 5e-2, 0.2),
}

# --- VPT baselines (Full / Linear / Bias rows): lr and wd were grid-searched on val200 per task and
# the winners are not published; the grids (base lr, multiplied by batch/256) and wd values:
VPT_GRID = {"full": (1e-3, 5e-4, 1e-4, 5e-3),
            "linear": (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05),
            "weight_decay": (0.01, 1e-3, 1e-4, 0.0)}

# --- Published VTAB-1k test accuracy (%), methods.md 9.1, in VTAB_TASKS order --------------------
_PAPER_COLUMNS = ("cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn",
                  "sun397", "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
                  "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                  "smallnorb_azi", "smallnorb_ele")  # the papers' column order
_PAPER_ROWS = {
    # method: (row label, source, printed params in M as (without head, with the mean head) -- None
    # where the paper printed no such number --, printed mean, the 19 values in the papers' order).
    # EFFT's 0.245M matches no released variant with certainty (methods.md 7).
    "full": ("Full fine-tuning", "RLRR/FacT/EFFT (from VPT)", (85.8, None), "plain 65.6 (R) / group 68.9 (F)",
             "68.9 87.7 64.3 97.2 86.9 87.4 38.8 79.7 95.7 84.2 73.9 56.3 58.6 41.7 65.5 57.5 46.7 25.7 29.1"),
    "linear": ("Linear probing", "RLRR (from VPT)", (0.0, 0.04), "plain 52.9",
               "63.4 85.0 63.2 97.0 86.3 36.6 51.0 78.5 87.5 68.6 74.0 34.3 30.6 33.2 55.4 12.5 20.0 9.6 19.2"),
    "bitfit": ("BitFit (Bias)", "RLRR/FacT/EFFT (from VPT)", (0.103, 0.14),
               "plain 62.1 (R) / group 65.2 (F)",
               "72.8 87.0 59.2 97.5 85.3 59.9 51.4 78.7 91.6 72.9 69.8 61.5 55.6 32.4 55.9 66.6 40.0 15.7 25.1"),
    "lora": ("LoRA r=8", "RLRR/FacT/EFFT (from NOAH)", (0.295, None), "plain 72.3 (R) / group 74.5 (F)",
             "67.1 91.4 69.4 98.8 90.4 85.3 54.0 84.9 95.3 84.4 73.6 82.9 69.2 49.8 78.5 75.7 47.1 31.0 44.0"),
    "ssf": ("SSF (AugReg)", "RLRR/EFFT", (None, 0.24), "plain 73.1",
            "69.0 92.6 75.1 99.4 91.8 90.2 52.9 87.4 95.9 87.4 75.5 75.9 62.3 53.3 80.6 77.3 54.9 29.5 37.9"),
    "rlrr": ("RLRR", "RLRR Table 2", (None, 0.33), "plain 74.5",
             "75.6 92.4 72.9 99.3 91.5 89.8 57.0 86.8 95.2 85.3 75.9 79.7 64.2 53.9 82.1 83.9 53.7 33.4 43.6"),
    "fact_tt": ("FacT-TT <=16", "FacT Table 1", (0.037, None), "group 75.3",
                "71.3 89.6 70.7 98.9 91.0 87.8 54.6 85.2 95.5 83.4 75.7 82.0 69.0 49.8 80.0 79.2 48.4 34.2 41.4"),
    "fact_tk": ("FacT-TK <=32", "FacT Table 1", (0.069, None), "group 75.6",
                "70.6 90.6 70.8 99.1 90.7 88.6 54.1 84.8 96.2 84.5 75.7 82.6 68.2 49.8 80.7 80.8 47.4 33.2 43.0"),
    "efft": ("EFFT (0.245M row)", "EFFT Table 1", (0.245, None), "plain 73.6 / group 75.9",
             "72.1 92.9 71.2 99.1 90.6 89.6 54.7 85.4 95.7 84.4 76.3 81.6 67.6 50.4 82.7 79.2 47.7 34.9 41.9"),
}
PAPER_RESULTS = {m: dict(zip(_PAPER_COLUMNS, map(float, row[4].split())))
                 for m, row in _PAPER_ROWS.items()}
PAPER_INFO = {m: {"row": r[0], "source": r[1], "params_no_head_m": r[2][0],
                  "params_with_head_m": r[2][1], "mean": r[3]}
              for m, r in _PAPER_ROWS.items()}
# RLRR paper Table 3 (FGVC, VPT splits)
PAPER_FGVC = {
    "full": {"cub200": 87.3, "nabirds": 82.7, "oxford_flowers": 98.8, "stanford_dogs": 89.4, "stanford_cars": 84.5},
    "linear": {"cub200": 85.3, "nabirds": 75.9, "oxford_flowers": 97.9, "stanford_dogs": 86.2, "stanford_cars": 51.3},
    "bitfit": {"cub200": 88.4, "nabirds": 84.2, "oxford_flowers": 98.8, "stanford_dogs": 91.2, "stanford_cars": 79.4},
    "lora": {"cub200": 88.3, "nabirds": 85.6, "oxford_flowers": 99.2, "stanford_dogs": 91.0, "stanford_cars": 83.2},
    "ssf": {"cub200": 89.5, "nabirds": 85.7, "oxford_flowers": 99.6, "stanford_dogs": 89.6, "stanford_cars": 89.2},
    "rlrr": {"cub200": 89.3, "nabirds": 84.7, "oxford_flowers": 99.5, "stanford_dogs": 92.0, "stanford_cars": 87.0},
}


def canonical_task(task: str) -> str:
    """VTAB short name from `cifar100`, `vtab/cifar100`, `cifar`, ... (ValueError lists valid ones)."""
    return vtab.get_task(task.strip()).name


def check_method(method: str, allowed=METHODS) -> str:
    m = method.strip().lower().replace("-", "_")
    if m not in allowed:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(allowed)}")
    return m

