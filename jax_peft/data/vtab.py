"""VTAB-1k: the 19 tasks with Google `task_adaptation` semantics, read from TFDS or the NOAH export.

Names are `vtab/<task>` (table below; short names such as `cifar100` or the export's directory
names such as `cifar` are accepted too). Splits: `train800`, `val200`, `train800val200` (what the
PEFT papers train on), `test`, and the full `train`, `val`, `trainval`.

Two sources, chosen per call:
  - the NOAH JPEG export the published numbers were trained on: used when `data_dir` contains
    `<export_dir>/<split>.txt` (e.g. `DATA/cifar/train800val200.txt`); labels in the lists are final
    and images already fixed (grayscale tiled, dSprites x255) but native-resolution JPEGs.
  - TFDS (`tfds.data_source`, array_record, no TensorFlow at training time) otherwise, with the
    builder/version pins, split strings, label functions and image fixes below.
    Split boundaries are hard-coded from the TFDS metadata (task_adaptation computes the same numbers
    from `builder.info.splits` at run time), so they also hold under `tfds.testing.mock_data`.

Note: TFDS pixels differ from the export (JPEG quality-75 re-encoding, dataset versions), so for
comparisons with the papers' tables use the export (`python -m jax_peft.data.prepare --help`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jax_peft.data import folder
from jax_peft.data.pipeline import DatasetUnavailableError, label_error, tfds_source

NATURAL = ("caltech101", "cifar100", "dtd", "oxford_flowers102", "oxford_iiit_pet", "sun397", "svhn")
SPECIALIZED = ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy")
STRUCTURED = ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
              "smallnorb_azi", "smallnorb_ele")
TASKS = NATURAL + SPECIALIZED + STRUCTURED
GROUPS = {"natural": NATURAL, "specialized": SPECIALIZED, "structured": STRUCTURED}
CROP_FRACTION = None  # VTAB: direct resize to the input size, no crop
SPLITS = ("train800", "val200", "train800val200", "test", "train", "val", "trainval")


# --- label functions (numpy versions of task_adaptation's tf code) --------------------------------
def _read_label(key: str, ex: dict) -> int:
    return int(ex[key])


def _label(key: str) -> Callable[[dict], int]:
    return functools.partial(_read_label, key)  # picklable (worker processes), unlike a lambda


def _clevr_count(ex: dict) -> int:
    """Number of objects - 3 (scenes hold 3..10 objects)."""
    return len(ex["objects"]["size"]) - 3


_CLEVR_DIST_THRESHOLDS = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])


def _clevr_dist(ex: dict) -> int:
    """Bin of the closest object's depth (pixel_coords[:, 2])."""
    dist = np.min(np.asarray(ex["objects"]["pixel_coords"], np.float32)[:, 2])
    return int(np.max(np.nonzero(_CLEVR_DIST_THRESHOLDS - dist < 0)[0]))


_KITTI_THRESHOLDS = np.array([-100.0, 8.0, 20.0, 999.0])


def _kitti_dist(ex: dict) -> int:
    """Closest vehicle (type < 3: Car, Van, Truck) depth binned at 8 m / 20 m; 3 = no vehicle."""
    types = np.asarray(ex["objects"]["type"])
    z = np.asarray(ex["objects"]["location"], np.float32).reshape(-1, 3)[:, 2]
    n = min(len(types), len(z))  # equal in real data; mocked sequences have independent lengths
    z = np.concatenate([z[:n][types[:n] < 3], np.array([1000.0], np.float32)])
    return int(np.max(np.nonzero(_KITTI_THRESHOLDS - np.min(z) < 0)[0]))


def _read_binned(key: str, factor: float, ex: dict) -> int:
    return int(np.floor(float(ex[key]) / factor))


def _binned(key: str, factor: float) -> Callable[[dict], int]:
    return functools.partial(_read_binned, key, factor)


# --- image fixes ------------------------------------------------------------------------------------
def _tile_gray(image: np.ndarray) -> np.ndarray:
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _dsprites_image(image: np.ndarray) -> np.ndarray:
    """0/1 pixels -> 0/255, 3 channels (computed wide and clipped so mocked data cannot wrap)."""
    return np.clip(_tile_gray(image).astype(np.int32) * 255, 0, 255).astype(np.uint8)


# --- the task table ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Task:
    name: str                  # jax_peft short name
    export_dir: str            # directory in the NOAH export
    group: str
    builder: str               # TFDS builder (with config) and version pin
    num_classes: int
    splits: dict[str, str]     # jax_peft split -> TFDS split string
    sizes: dict[str, int]      # jax_peft split -> number of examples
    label_fn: Callable[[dict], int]
    image_fix: Callable[[np.ndarray], np.ndarray] | None = None
    manual: str = ""           # manual-download instructions, if any


def _native_val(train: int, val: int, test: int, *, val_name="validation") -> tuple[dict, dict]:
    """Datasets with their own validation split."""
    splits = {"train": "train", "val": val_name, "trainval": f"train+{val_name}", "test": "test",
              "train800": "train[:800]", "val200": f"{val_name}[:200]",
              "train800val200": f"train[:800]+{val_name}[:200]"}
    sizes = {"train": train, "val": val, "trainval": train + val, "test": test}
    return splits, sizes


def _carved(total: int, train_end: int, val_end: int | None, test: str, test_size: int
            ) -> tuple[dict, dict]:
    """Datasets whose train (and val) are carved from TFDS `train` by index boundaries."""
    val_end_s = "" if val_end is None else str(val_end)
    splits = {"train": f"train[:{train_end}]", "val": f"train[{train_end}:{val_end_s}]",
              "trainval": "train" if val_end is None else f"train[:{val_end}]", "test": test,
              "train800": "train[:800]", "val200": f"train[{train_end}:{train_end + 200}]",
              "train800val200": f"train[:800]+train[{train_end}:{train_end + 200}]"}
    end = total if val_end is None else val_end
    sizes = {"train": train_end, "val": end - train_end, "trainval": end, "test": test_size}
    return splits, sizes


def _task(name, export_dir, group, builder, num_classes, split_sizes, label_fn=None, image_fix=None,
          manual=""):
    splits, sizes = split_sizes
    sizes = dict(sizes, train800=800, val200=200, train800val200=1000)
    return Task(name, export_dir, group, builder, num_classes, splits, sizes,
                label_fn or _label("label"), image_fix, manual)


_RESISC_NOTE = ("resisc45 needs a manual download: put NWPU-RESISC45.rar into "
                "<data_dir>/downloads/manual/ (from the dataset authors' OneDrive), then run prepare.")
_RETINO_NOTE = ("diabetic_retinopathy_detection needs a manual download from Kaggle (competition "
                "'diabetic-retinopathy-detection'): put sample.zip, sampleSubmission.csv.zip, "
                "trainLabels.csv.zip, train.zip.00{1..5}, test.zip.00{1..7} into "
                "<data_dir>/downloads/manual/, then run prepare.")

# smallNORB: val and test are the two halves of TFDS `test`.
_SMALLNORB = ({"train": "train", "val": "test[:50%]", "trainval": "train+test[:50%]",
               "test": "test[50%:]", "train800": "train[:800]", "val200": "test[:200]",
               "train800val200": "train[:800]+test[:200]"},
              {"train": 24300, "val": 12150, "trainval": 36450, "test": 12150})

_TASKS: dict[str, Task] = {t.name: t for t in [
    _task("caltech101", "caltech101", "natural", "caltech101:3.*.*", 102,
          _carved(3060, 2754, None, "test", 6084)),
    _task("cifar100", "cifar", "natural", "cifar100:3.*.*", 100,
          _carved(50000, 45000, None, "test", 10000)),
    _task("dtd", "dtd", "natural", "dtd:3.*.*", 47, _native_val(1880, 1880, 1880)),
    _task("oxford_flowers102", "oxford_flowers102", "natural", "oxford_flowers102:2.*.*", 102,
          _native_val(1020, 1020, 6149)),
    # task_adaptation pins 3.*.*; TFDS 4.9.10 only builds 4.0.0 (records may differ from 3.x).
    _task("oxford_iiit_pet", "oxford_iiit_pet", "natural", "oxford_iiit_pet:4.*.*", 37,
          _carved(3680, 2944, None, "test", 3669)),
    _task("sun397", "sun397", "natural", "sun397/tfds:4.*.*", 397, _native_val(76128, 10875, 21750)),
    _task("svhn", "svhn", "natural", "svhn_cropped:3.*.*", 10,
          _carved(73257, 65931, None, "test", 26032)),
    _task("patch_camelyon", "patch_camelyon", "specialized", "patch_camelyon:2.*.*", 2,
          _native_val(262144, 32768, 32768)),
    _task("eurosat", "eurosat", "specialized", "eurosat/rgb:2.*.*", 10,
          _carved(27000, 16200, 21600, "train[21600:]", 5400)),
    _task("resisc45", "resisc45", "specialized", "resisc45:3.*.*", 45,
          _carved(31500, 18900, 25200, "train[25200:]", 6300), manual=_RESISC_NOTE),
    _task("diabetic_retinopathy", "diabetic_retinopathy", "specialized",
          "diabetic_retinopathy_detection/btgraham-300:3.*.*", 5,
          _native_val(35126, 10906, 42670), manual=_RETINO_NOTE),
    _task("clevr_count", "clevr_count", "structured", "clevr:3.*.*", 8,
          _carved(70000, 63000, None, "validation", 15000), _clevr_count),
    _task("clevr_dist", "clevr_dist", "structured", "clevr:3.*.*", 6,
          _carved(70000, 63000, None, "validation", 15000), _clevr_dist),
    _task("dmlab", "dmlab", "structured", "dmlab:2.0.1", 6, _native_val(65550, 22628, 22735)),
    # task_adaptation pins 3.1.0 (VPT's notes recommend 3.2.0; both build in TFDS 4.9.10).
    _task("kitti", "kitti", "structured", "kitti:3.1.0", 4, _native_val(6347, 423, 711), _kitti_dist),
    _task("dsprites_loc", "dsprites_loc", "structured", "dsprites:2.*.*", 16,
          _carved(737280, 589824, 663552, "train[663552:]", 73728),
          _binned("label_x_position", 32 / 16), _dsprites_image),
    _task("dsprites_ori", "dsprites_ori", "structured", "dsprites:2.*.*", 16,
          _carved(737280, 589824, 663552, "train[663552:]", 73728),
          _binned("label_orientation", 40 / 16), _dsprites_image),
    _task("smallnorb_azi", "smallnorb_azi", "structured", "smallnorb:2.*.*", 18,
          _SMALLNORB, _label("label_azimuth"), _tile_gray),
    _task("smallnorb_ele", "smallnorb_ele", "structured", "smallnorb:2.*.*", 9, _SMALLNORB,
          _label("label_elevation"), _tile_gray),
]}

_ALIASES = {"cifar": "cifar100", "svhn_cropped": "svhn", "sun397/tfds": "sun397",
            "diabetic_retinopathy_detection": "diabetic_retinopathy", "caltech": "caltech101",
            "flowers": "oxford_flowers102", "pets": "oxford_iiit_pet", "pet": "oxford_iiit_pet",
            "camelyon": "patch_camelyon", "retinopathy": "diabetic_retinopathy", "sun": "sun397"}
assert tuple(_TASKS) == TASKS


def vtab_tasks() -> list[str]:
    """The 19 VTAB-1k task names, `vtab/<task>`, Natural then Specialized then Structured."""
    return [f"vtab/{t}" for t in TASKS]


def get_task(name: str) -> Task:
    """Task by `vtab/<task>`, short name (`cifar100`) or export directory name (`cifar`)."""
    short = name[len("vtab/"):] if name.startswith("vtab/") else name
    short = _ALIASES.get(short, short)
    if short not in _TASKS:
        raise ValueError(f"unknown VTAB task {name!r}; valid tasks: {', '.join(vtab_tasks())}")
    return _TASKS[short]


def _check_split(task: Task, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for vtab/{task.name}; valid splits: {', '.join(SPLITS)}")


def export_list_file(data_dir: str | None, task: Task, split: str) -> str | None:
    """Path of the NOAH-export list file for (task, split) if it exists under data_dir."""
    if not data_dir:
        return None
    path = os.path.join(data_dir, task.export_dir, f"{split}.txt")
    return path if os.path.isfile(path) else None


def _export_source(data_dir: str | None, task: Task, split: str):
    path = export_list_file(data_dir, task, split)
    if path:
        return folder.ListSource(path)
    if split == "train800val200":
        parts = [export_list_file(data_dir, task, s) for s in ("train800", "val200")]
        if all(parts):
            return folder.ConcatSource(*(folder.ListSource(p) for p in parts))
    return None


class TaskSource:
    """TFDS records of one task -> {"image": uint8 (H, W, 3|1), "label": int} with the task's label
    function and image fix. A label outside [0, num_classes) raises `ExampleError` naming the task,
    split, record and label (real data cannot produce one; a wrong TFDS version or corrupted files can)."""

    def __init__(self, records: Sequence, task: Task, split: str = ""):
        self.records, self.task, self.split = records, task, split

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, index: int) -> str:
        """Where record `index` comes from (for error messages)."""
        return f"TFDS {self.task.builder} {self.task.splits.get(self.split, self.split)!r}, record {index}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.records[index]
        image = np.asarray(ex["image"])
        if self.task.image_fix is not None:
            image = self.task.image_fix(image)
        label = self.task.label_fn(ex)
        if not 0 <= label < self.task.num_classes:
            raise label_error(f"vtab/{self.task.name} split {self.split!r}", int(index), label, self.task.num_classes,
                              self.describe(int(index)),
                              fix=f"The prepared TFDS data may be of another version or damaged: prepare it again "
                                  f"(python -m jax_peft.data.prepare vtab/{self.task.name})")
        return {"image": image, "label": label}


def get_source(name: str, split: str, *, data_dir: str | None = None):
    """Random-access source of (task, split): the NOAH export if present in data_dir, else TFDS."""
    task = get_task(name)
    _check_split(task, split)
    exported = _export_source(data_dir, task, split)
    if exported is not None:
        return exported
    records = tfds_source(task.builder, task.splits[split], data_dir,
                          prepare_name=f"vtab/{task.name}", manual_note=task.manual)
    return TaskSource(records, task, split)


def num_classes(name: str) -> int:
    return get_task(name).num_classes


def dataset_info(name: str, split: str, *, data_dir: str | None = None) -> dict:
    """{"num_examples", "num_classes"}: the configured split size (the export's list length when
    reading the export)."""
    task = get_task(name)
    _check_split(task, split)
    n = task.sizes[split]
    path = export_list_file(data_dir, task, split)
    if path:
        n = folder.count_lines(path)
    return {"num_examples": n, "num_classes": task.num_classes}


def group_of(name: str) -> str:
    return get_task(name).group


__all__ = ["TASKS", "GROUPS", "SPLITS", "Task", "vtab_tasks", "get_task", "get_source", "num_classes",
           "dataset_info", "DatasetUnavailableError"]
