"""FGVC benchmark (VPT splits): CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars.

Names `fgvc/<dataset>`; splits `train`, `val`, `trainval` (what RLRR/SSF train on) and `test`.

Two sources:
  - VPT's split files (authoritative for the published numbers): `train.json`, `val.json`,
    `test.json` (optionally `trainval.json`; otherwise train + val are merged), each a JSON object
    `{"relative/image/path.jpg": class_id}`, in `<data_dir>/<dir>/` (or directly in `data_dir`), with
    images where VPT's loaders look for them: CUB and NABirds under `images/`, Dogs under
    `Images/`, Cars and Flowers beside the JSON files. Class ids are mapped to contiguous labels by
    sorting the ids of the split file, as VPT's JSONDataset does. NABirds exists only this way.
  - TFDS otherwise (`caltech_birds2011`, `oxford_flowers102`, `stanford_dogs`, `cars196`): only
    `trainval` (the official training set, = VPT train + val) and `test` exist there; VPT's
    train/val carve-out needs the JSON files.

Preprocessing convention (RLRR/VPT): train Resize(256, 256) -> RandomCrop 224 -> flip; test
Resize(256, 256) -> CenterCrop 224 (`CROP_FRACTION` = 224/256).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from jax_peft.data import folder
from jax_peft.data.pipeline import DatasetUnavailableError, tfds_source

CROP_FRACTION = 0.875
SPLITS = ("train", "val", "trainval", "test")


@dataclasses.dataclass(frozen=True)
class FGVCDataset:
    name: str
    num_classes: int
    directory: str                     # default sub-directory of data_dir holding the JSON files
    image_subdir: str                  # VPT's get_imagedir relative to that directory
    vpt_sizes: dict[str, int]          # train / val / test in VPT's split files
    tfds_builder: str | None           # None: not in TFDS
    tfds_splits: dict[str, str]        # jax_peft split -> TFDS split string
    tfds_sizes: dict[str, int]


def _vpt_sizes(train, val, test):
    return {"train": train, "val": val, "trainval": train + val, "test": test}


DATASETS = {d.name: d for d in [
    FGVCDataset("cub200", 200, "CUB_200_2011", "images", _vpt_sizes(5394, 600, 5794),
                "caltech_birds2011:0.*.*", {"trainval": "train", "test": "test"},
                {"trainval": 5994, "test": 5794}),
    FGVCDataset("nabirds", 555, "nabirds", "images", _vpt_sizes(21536, 2393, 24633), None, {}, {}),
    FGVCDataset("oxford_flowers", 102, "OxfordFlower", "", _vpt_sizes(1020, 1020, 6149),
                "oxford_flowers102:2.*.*", {"trainval": "train+validation", "test": "test"},
                {"trainval": 2040, "test": 6149}),
    FGVCDataset("stanford_dogs", 120, "Stanford-dogs", "Images", _vpt_sizes(10800, 1200, 8580),
                "stanford_dogs:0.*.*", {"trainval": "train", "test": "test"},
                {"trainval": 12000, "test": 8580}),
    FGVCDataset("stanford_cars", 196, "Stanford-cars", "", _vpt_sizes(7329, 815, 8041),
                "cars196:2.*.*", {"trainval": "train", "test": "test"},
                {"trainval": 8144, "test": 8041}),
]}
_ALIASES = {"cub": "cub200", "cub_200_2011": "cub200", "caltech_birds2011": "cub200",
            "flowers": "oxford_flowers", "oxford_flowers102": "oxford_flowers", "dogs": "stanford_dogs",
            "cars": "stanford_cars", "cars196": "stanford_cars"}


def names() -> list[str]:
    return [f"fgvc/{n}" for n in DATASETS]


def get_dataset(name: str) -> FGVCDataset:
    short = name[len("fgvc/"):] if name.startswith("fgvc/") else name
    short = _ALIASES.get(short, short)
    if short not in DATASETS:
        raise ValueError(f"unknown FGVC dataset {name!r}; valid names: {', '.join(names())}")
    return DATASETS[short]


def _check_split(ds: FGVCDataset, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for fgvc/{ds.name}; valid splits: {', '.join(SPLITS)}")


def json_dir(ds: FGVCDataset, data_dir: str | None) -> str | None:
    """The directory holding VPT's split files, if any: data_dir itself or data_dir/<directory>."""
    if not data_dir:
        return None
    for d in (data_dir, os.path.join(data_dir, ds.directory)):
        if os.path.isfile(os.path.join(d, "test.json")) or os.path.isfile(os.path.join(d, "train.json")):
            return d
    return None


def read_split_json(directory: str, split: str) -> dict[str, int]:
    """VPT annotation dict {relative path: class id}; trainval = trainval.json or train + val."""
    path = os.path.join(directory, f"{split}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    if split == "trainval":
        merged = {}
        for part in ("train", "val"):
            merged.update(read_split_json(directory, part))
        return merged
    raise FileNotFoundError(f"VPT split file {path!r} not found")


def class_index(directory: str) -> dict[Any, int]:
    """{class id: contiguous label} from the sorted class ids of ALL split files in `directory`, so
    a class missing from one split (e.g. train.json) gets the same label in every split. (VPT's
    JSONDataset sorts each split's ids separately; identical when every split holds every class.)"""
    ids: set = set()
    for part in ("train", "val", "trainval", "test"):
        path = os.path.join(directory, f"{part}.json")
        if os.path.isfile(path):
            with open(path) as f:
                ids.update(json.load(f).values())
    return {c: i for i, c in enumerate(sorted(ids))}


class JSONSource:
    """VPT JSONDataset semantics: contiguous labels from the sorted class ids (of all split files,
    `class_index`)."""

    def __init__(self, directory: str, image_dir: str, split: str):
        anno = read_split_json(directory, split)
        if not anno:
            raise ValueError(f"{split} split file in {directory!r} is empty")
        cont = class_index(directory)
        self.paths = list(anno)
        self.labels = np.asarray([cont[anno[p]] for p in self.paths], np.int64)
        self.image_dir = image_dir

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return os.path.join(self.image_dir, self.paths[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = os.path.join(self.image_dir, self.paths[index])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {path!r} (from the VPT split file) does not exist")
        return {"image": folder.load_image(path), "label": int(self.labels[index])}


class _LabelSource:
    """TFDS records -> {"image", "label"}."""

    def __init__(self, records):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.records[index]
        return {"image": np.asarray(ex["image"]), "label": int(ex["label"])}


def _missing_json_message(ds: FGVCDataset, split: str, data_dir: str | None) -> str:
    where = os.path.join(data_dir or "<data_dir>", ds.directory)
    img = os.path.join(where, ds.image_subdir) if ds.image_subdir else where
    return (f"fgvc/{ds.name} split {split!r} needs VPT's split files: put train.json, val.json and "
            f"test.json (from the VPT repository's FGVC splits) in {where} and the images under {img}, "
            f"then pass data_dir={data_dir or '<data_dir>'}")


def get_source(name: str, split: str, *, data_dir: str | None = None):
    ds = get_dataset(name)
    _check_split(ds, split)
    d = json_dir(ds, data_dir)
    if d is not None:
        return JSONSource(d, os.path.join(d, ds.image_subdir) if ds.image_subdir else d, split)
    if ds.tfds_builder is None or split not in ds.tfds_splits:
        raise DatasetUnavailableError(_missing_json_message(ds, split, data_dir))
    records = tfds_source(ds.tfds_builder, ds.tfds_splits[split], data_dir, prepare_name=f"fgvc/{ds.name}")
    return _LabelSource(records)


def num_classes(name: str) -> int:
    return get_dataset(name).num_classes


def dataset_info(name: str, split: str, *, data_dir: str | None = None) -> dict:
    ds = get_dataset(name)
    _check_split(ds, split)
    d = json_dir(ds, data_dir)
    if d is not None:
        n = len(read_split_json(d, split))
    elif split in ds.tfds_sizes:
        n = ds.tfds_sizes[split]
    else:  # VPT's published split sizes (reading the split needs the JSON files)
        n = ds.vpt_sizes[split]
    return {"num_examples": n, "num_classes": ds.num_classes}
