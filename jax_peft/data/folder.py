"""Image-folder datasets described by list files (`relative/path label` per line).

This is the format of the NOAH VTAB-1k export the PEFT papers trained on
(`<root>/<task>/<split>.txt` with lines `images/<split>/000123.jpg 7`, images beside it), of NOAH's
few-shot lists (`train_meta.list.num_shot_16.seed_0`, ...) and of any user dataset laid out the same
way. Images are decoded with PIL and converted to RGB (grayscale JPEGs are tiled to 3 channels).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image


def read_list(list_file: str) -> tuple[list[str], np.ndarray]:
    """Parses a list file into (relative paths, int64 labels). The label is the last field, so
    paths may contain spaces."""
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"list file {list_file!r} not found")
    paths, labels = [], []
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{list_file}:{lineno}: expected 'path label', got {line!r}")
            try:
                labels.append(int(parts[1]))
            except ValueError:
                raise ValueError(f"{list_file}:{lineno}: label {parts[1]!r} is not an integer") from None
            paths.append(parts[0])
    if not paths:
        raise ValueError(f"list file {list_file!r} is empty")
    return paths, np.asarray(labels, np.int64)


def load_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) from any PIL-readable file; a file that cannot be decoded raises ValueError
    naming it (a missing one FileNotFoundError)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e}. The file is truncated or not "
                         "an image: replace it (download or export it again) or remove it from the split") from e


class ListSource:
    """Random-access source over a list file: `source[i] -> {"image": uint8 (H, W, 3), "label": int}`.

    Args:
      list_file: the `path label` file.
      image_root: directory the paths are relative to (default: the list file's directory).
    """

    def __init__(self, list_file: str, image_root: str | None = None):
        self.list_file = list_file
        self.image_root = image_root if image_root is not None else os.path.dirname(list_file)
        self.paths, self.labels = read_list(list_file)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        """Where example `index` comes from (for error messages)."""
        return f"{os.path.join(self.image_root, self.paths[index])}, entry {index + 1} of {self.list_file}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = os.path.join(self.image_root, self.paths[index])
        try:
            image = load_image(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image {path!r} listed in {self.list_file!r} does not exist") from None
        return {"image": image, "label": int(self.labels[index])}


class ConcatSource:
    """Concatenation of sources (e.g. train800 + val200 from two list files)."""

    def __init__(self, *sources):
        self.sources = sources
        self._offsets = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.sources[k], index - int(self._offsets[k])

    def __getitem__(self, index: int) -> dict[str, Any]:
        source, i = self._locate(index)
        return source[i]

    def describe(self, index: int) -> str:
        source, i = self._locate(index)
        return getattr(source, "describe", lambda j: "")(i)


def count_lines(list_file: str) -> int:
    with open(list_file) as f:
        return sum(1 for line in f if line.strip())


def folder_split_file(root: str, dataset: str, split: str) -> str:
    """`<root>/<dataset>/<split>.txt`."""
    return os.path.join(root, dataset, f"{split}.txt")


def folder_source(root: str, dataset: str, split: str) -> ListSource:
    """A generic `folder/<dataset>` split: `<root>/<dataset>/<split>.txt`, paths relative to
    `<root>/<dataset>`."""
    list_file = folder_split_file(root, dataset, split)
    if not os.path.isfile(list_file):
        available = sorted(f[:-4] for f in os.listdir(os.path.join(root, dataset))
                           if f.endswith(".txt")) if os.path.isdir(os.path.join(root, dataset)) else []
        raise FileNotFoundError(
            f"no list file {list_file!r}; expected lines 'relative/path label'"
            + (f"; available splits: {', '.join(available)}" if available else
               f"; create {os.path.join(root, dataset)} with one <split>.txt per split"))
    return ListSource(list_file, os.path.join(root, dataset))


# --- the `folder/<dataset>` family ------------------------------------------------------------------
CROP_FRACTION = None  # direct resize, as the VTAB export recipes


def _dataset_dir(name: str, data_dir: str | None) -> tuple[str, str]:
    dataset = name[len("folder/"):] if name.startswith("folder/") else name
    if not data_dir:
        raise ValueError(f"{name!r} needs data_dir: the directory holding {dataset}/<split>.txt")
    return data_dir, dataset


def get_source(name: str, split: str, *, data_dir: str | None = None) -> ListSource:
    root, dataset = _dataset_dir(name, data_dir)
    return folder_source(root, dataset, split)


def num_classes(name: str, *, data_dir: str | None = None) -> int:
    """1 + the largest label over every `<split>.txt` of the dataset. Label ids that no split uses
    are reported with a warning (a typo such as 100 for 10 would
    otherwise add classes silently)."""
    import warnings

    root, dataset = _dataset_dir(name, data_dir)
    d = os.path.join(root, dataset)
    files = sorted(f for f in os.listdir(d) if f.endswith(".txt")) if os.path.isdir(d) else []
    if not files:
        raise FileNotFoundError(f"no <split>.txt list files in {d!r}")
    labels = np.unique(np.concatenate([read_list(os.path.join(d, f))[1] for f in files]))
    used = labels[labels >= 0]  # negative labels are refused per example by the batch iterator
    count = int(labels[-1]) + 1
    if len(used) < count:
        unused = sorted(set(range(count)) - set(used.tolist()))
        warnings.warn(f"{name}: labels run to {count - 1}, but no list file in {d} uses "
                      f"{unused[:10]}{' ...' if len(unused) > 10 else ''} ({count - len(used)} of {count} "
                      "classes): check the labels (the model gets a class per id up to the largest)",
                      stacklevel=2)
    return count


def dataset_info(name: str, split: str, *, data_dir: str | None = None) -> dict:
    root, dataset = _dataset_dir(name, data_dir)
    list_file = folder_split_file(root, dataset, split)
    if not os.path.isfile(list_file):
        folder_source(root, dataset, split)  # raises the explanatory error
    return {"num_examples": count_lines(list_file), "num_classes": num_classes(name, data_dir=data_dir)}
