"""Few-shot fine-grained classification (FacT / NOAH protocol): k in {1, 2, 4, 8, 16}, seeds 0, 1, 2.

Names `fewshot/<dataset>` for food101, stanford_cars, oxford_flowers102, oxford_iiit_pet,
fgvc_aircraft. Splits: `train_{k}shot_seed{s}` (e.g. `train_16shot_seed0`), `val`, `test`.

Two sources:
  - NOAH's list files (the published protocol): `train_meta.list.num_shot_{k}.seed_{s}`,
    `val_meta.list`, `test_meta.list` (lines `relative/path label`) in
    `<data_dir>/few-shot_split/<dir>/annotations/` (the layout FacT's code reads) or
    `<data_dir>/<dir>/annotations/` or `<data_dir>/<dir>/`, with images under `<data_dir>/<dir>/`.
    `<dir>` is one of the directory names listed in `DATASETS` (NOAH's spellings are accepted).
    FGVC-Aircraft exists only this way (it is not in TFDS).
  - TFDS otherwise: the k-shot training list is sampled from the TFDS training split by
    `sample_k_shot` (per class, k indices without replacement, numpy seeded by the seed), which is
    a different sample than NOAH's files; `test` is the TFDS test split (Food-101: `validation`).
    The label array used for sampling is cached in `<data_dir>/jax_peft_labels/`.

Preprocessing: random-resized crop + flip for training and Resize(256) -> CenterCrop(224) for
evaluation (`CROP_FRACTION`), ImageNet normalization (jax_peft.configs.fewshot). NOAH's RandAugment,
random erasing, mixup/cutmix and label smoothing are not reproduced.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

from jax_peft.data import folder
from jax_peft.data.pipeline import DatasetUnavailableError, tfds_source

CROP_FRACTION = 0.875
SHOTS = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2)
_TRAIN_RE = re.compile(r"^train_(\d+)shot_seed(\d+)$")


@dataclasses.dataclass(frozen=True)
class FewShotDataset:
    name: str
    num_classes: int
    dirs: tuple[str, ...]          # accepted directory names (NOAH's first)
    noah_sizes: dict[str, int]     # val / test sizes of NOAH's lists
    tfds_builder: str | None
    tfds_train: str = "train"
    tfds_test: str = "test"
    tfds_val: str | None = None
    tfds_sizes: dict[str, int] = dataclasses.field(default_factory=dict)


DATASETS = {d.name: d for d in [
    FewShotDataset("food101", 101, ("food-101", "food101"), {"val": 20200, "test": 30300},
                   "food101:2.*.*", tfds_test="validation", tfds_sizes={"test": 25250}),
    FewShotDataset("stanford_cars", 196, ("stanford_cars", "standford-cars", "stanford-cars"),
                   {"val": 1635, "test": 8041}, "cars196:2.*.*", tfds_sizes={"test": 8041}),
    FewShotDataset("oxford_flowers102", 102, ("oxford-flowers102", "oxford_flowers102", "flowers102"),
                   {"val": 1633, "test": 2463}, "oxford_flowers102:2.*.*", tfds_val="validation",
                   tfds_sizes={"val": 1020, "test": 6149}),
    FewShotDataset("oxford_iiit_pet", 37, ("oxford-pets", "oxford_pets", "oxford_iiit_pet"),
                   {"val": 736, "test": 3669}, "oxford_iiit_pet:4.*.*", tfds_sizes={"test": 3669}),
    FewShotDataset("fgvc_aircraft", 100, ("fgvc-aircraft", "fgvc_aircraft"),
                   {"val": 3333, "test": 3333}, None),
]}
_ALIASES = {"food": "food101", "cars": "stanford_cars", "cars196": "stanford_cars",
            "flowers": "oxford_flowers102", "flowers102": "oxford_flowers102", "pets": "oxford_iiit_pet",
            "oxford_pets": "oxford_iiit_pet", "aircraft": "fgvc_aircraft"}


def names() -> list[str]:
    return [f"fewshot/{n}" for n in DATASETS]


def get_dataset(name: str) -> FewShotDataset:
    short = name[len("fewshot/"):] if name.startswith("fewshot/") else name
    short = _ALIASES.get(short, short)
    if short not in DATASETS:
        raise ValueError(f"unknown few-shot dataset {name!r}; valid names: {', '.join(names())}")
    return DATASETS[short]


def parse_split(split: str) -> tuple[str, int | None, int | None]:
    """"train_16shot_seed0" -> ("train", 16, 0); "val" / "test" -> (split, None, None)."""
    if split in ("val", "test"):
        return split, None, None
    m = _TRAIN_RE.match(split)
    if not m:
        raise ValueError(f"unknown few-shot split {split!r}; use 'train_{{k}}shot_seed{{s}}' "
                         f"(k in {SHOTS}, e.g. 'train_16shot_seed0'), 'val' or 'test'")
    return "train", int(m.group(1)), int(m.group(2))


def list_filename(split: str) -> str:
    kind, k, s = parse_split(split)
    return f"train_meta.list.num_shot_{k}.seed_{s}" if kind == "train" else f"{kind}_meta.list"


def find_list(ds: FewShotDataset, split: str, data_dir: str | None) -> tuple[str, str] | None:
    """(list file, image root) of NOAH's files for this split under data_dir, if present."""
    if not data_dir:
        return None
    fname = list_filename(split)
    for d in ds.dirs:
        for list_dir in (os.path.join(data_dir, "few-shot_split", d, "annotations"),
                         os.path.join(data_dir, d, "annotations"), os.path.join(data_dir, d)):
            path = os.path.join(list_dir, fname)
            if os.path.isfile(path):
                return path, os.path.join(data_dir, d)
    return None


def sample_k_shot(labels: np.ndarray, k: int, seed: int, num_classes: int) -> np.ndarray:
    """Indices of k examples per class (class order, ascending indices within a class), drawn
    without replacement by np.random.default_rng(seed); ValueError if a class has < k examples."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            raise ValueError(f"class {c} has {len(idx)} training examples, fewer than k={k}")
        out.append(np.sort(rng.choice(idx, size=k, replace=False)))
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def _labels_of(records, cache: str | None) -> np.ndarray:
    if cache and os.path.isfile(cache):
        labels = np.load(cache)
        if len(labels) == len(records):
            return labels
    labels = np.asarray([int(records[i]["label"]) for i in range(len(records))], np.int64)
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        np.save(cache, labels)
    return labels


class _Subset:
    def __init__(self, records, indices: np.ndarray):
        self.records, self.indices = records, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.records[int(self.indices[index])]
        return {"image": np.asarray(ex["image"]), "label": int(ex["label"])}


def _missing_message(ds: FewShotDataset, split: str, data_dir: str | None, why: str) -> str:
    root = data_dir or "<data_dir>"
    return (f"fewshot/{ds.name} split {split!r} {why}: put NOAH's list file {list_filename(split)} in "
            f"{os.path.join(root, 'few-shot_split', ds.dirs[0], 'annotations')} and the images under "
            f"{os.path.join(root, ds.dirs[0])}, then pass data_dir={root}")


def get_source(name: str, split: str, *, data_dir: str | None = None):
    ds = get_dataset(name)
    kind, k, seed = parse_split(split)
    found = find_list(ds, split, data_dir)
    if found is not None:
        return folder.ListSource(*found)
    if ds.tfds_builder is None:
        raise DatasetUnavailableError(_missing_message(ds, split, data_dir, "is not in TFDS"))
    prepare = f"fewshot/{ds.name}"
    if kind == "train":
        if k not in SHOTS:
            raise ValueError(f"k={k} is not a few-shot setting; use one of {SHOTS}")
        records = tfds_source(ds.tfds_builder, ds.tfds_train, data_dir, prepare_name=prepare)
        cache = (os.path.join(data_dir, "jax_peft_labels",
                              f"{ds.tfds_builder.replace(':', '_').replace('/', '_').replace('*', 'x')}"
                              f"_{ds.tfds_train}.npy") if data_dir else None)
        labels = _labels_of(records, cache)
        return _Subset(records, sample_k_shot(labels, k, seed, ds.num_classes))
    tfds_split = ds.tfds_test if kind == "test" else ds.tfds_val
    if tfds_split is None:
        raise DatasetUnavailableError(_missing_message(ds, split, data_dir, "has no TFDS counterpart"))
    records = tfds_source(ds.tfds_builder, tfds_split, data_dir, prepare_name=prepare)
    return _Subset(records, np.arange(len(records)))


def num_classes(name: str) -> int:
    return get_dataset(name).num_classes


def dataset_info(name: str, split: str, *, data_dir: str | None = None) -> dict:
    ds = get_dataset(name)
    kind, k, _ = parse_split(split)
    found = find_list(ds, split, data_dir)
    if found is not None:
        n = folder.count_lines(found[0])
    elif kind == "train":
        n = k * ds.num_classes
    elif kind in ds.tfds_sizes:
        n = ds.tfds_sizes[kind]
    else:
        raise DatasetUnavailableError(_missing_message(ds, split, data_dir, "is not available"))
    return {"num_examples": n, "num_classes": ds.num_classes}
