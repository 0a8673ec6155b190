"""Datasets for fine-tuning: VTAB-1k, FGVC, few-shot, image folders and synthetic demo data.

    it = jax_peft.data.make_dataset("vtab/cifar100", "train800val200", batch_size=32, image_size=224,
                                    train=True, seed=42, normalization="minus_one_one", hflip=False)
    batch = next(it)   # {"image": float32 (B, 224, 224, 3), "label": int32 (B,)}
                       # (normalize=False: uint8 images, normalized later on the device)
    it.stats           # {"batches", "wait_s", "load_s"}: input time as seen by the step loop

Names are `<family>/<dataset>`:

    vtab/<task>        the 19 VTAB-1k tasks (`vtab_tasks()`), TFDS or the NOAH JPEG export
                       (jax_peft.data.vtab)
    fgvc/<dataset>     cub200, nabirds, oxford_flowers, stanford_dogs, stanford_cars (jax_peft.data.fgvc)
    fewshot/<dataset>  food101, stanford_cars, oxford_flowers102, oxford_iiit_pet, fgvc_aircraft;
                       splits `train_{k}shot_seed{s}`, `val`, `test` (jax_peft.data.fewshot)
    folder/<dataset>   `<data_dir>/<dataset>/<split>.txt` list files (`path label` lines)
    synthetic/<...>    generated demo data (jax_peft.data.synthetic)

Training iterators (train=True) are infinite, reshuffled every epoch with a key from (seed, epoch),
identical on every host, each host taking its disjoint slice of every global batch; `start_batch=k`
resumes exactly at batch k. Eval iterators (train=False) make one pass in stored order with padded
last batches and a `mask`. See `jax_peft.data.pipeline` for the exact order.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from jax_peft.data.pipeline import BatchIterator, BatchPlan, DatasetUnavailableError, ExampleError
from jax_peft.data.preprocess import NORMALIZATIONS, Preprocess

# family -> module implementing get_source / num_classes / dataset_info / CROP_FRACTION / names
_FAMILIES = {
    "vtab": "jax_peft.data.vtab",
    "fgvc": "jax_peft.data.fgvc",
    "fewshot": "jax_peft.data.fewshot",
    "folder": "jax_peft.data.folder",
    "synthetic": "jax_peft.data.synthetic",
}


def _split_name(name: str) -> tuple[str, str]:
    if not isinstance(name, str) or "/" not in name:
        raise ValueError(f"dataset name {name!r} must look like '<family>/<dataset>'; families: "
                         f"{', '.join(_FAMILIES)} (e.g. 'vtab/cifar100'; "
                         f"all VTAB tasks: {', '.join(vtab_tasks())})")
    family = name.split("/", 1)[0]
    if family not in _FAMILIES:
        raise ValueError(f"unknown dataset family {family!r} in {name!r}; valid families: "
                         f"{', '.join(_FAMILIES)}")
    return family, name


def _module(family: str):
    return importlib.import_module(_FAMILIES[family])


def vtab_tasks() -> list[str]:
    """The 19 VTAB-1k task names in the standard order ("vtab/caltech101", ..., "vtab/smallnorb_ele")."""
    from jax_peft.data import vtab

    return vtab.vtab_tasks()


def num_classes(name: str, *, data_dir: str | None = None) -> int:
    """Number of classes of a dataset (`data_dir` is only needed for `folder/` datasets)."""
    family, name = _split_name(name)
    mod = _module(family)
    if family == "folder":
        return mod.num_classes(name, data_dir=data_dir)
    return mod.num_classes(name)


_class_count = num_classes  # for make_dataset, whose argument of that name shadows it


def dataset_info(name: str, split: str, *, data_dir: str | None = None) -> dict:
    """dict(num_examples=int, num_classes=int) of a split, without reading images."""
    family, name = _split_name(name)
    return dict(_module(family).dataset_info(name, split, data_dir=data_dir))


def get_source(name: str, split: str, *, data_dir: str | None = None, image_size: int | None = None):
    """The random-access record source behind `make_dataset`: `len(src)`, `src[i] -> {"image":
    uint8 (H, W, C), "label": int}` (task label functions and image fixes applied). Synthetic
    datasets are rendered at `image_size` (required for them, ignored otherwise)."""
    family, name = _split_name(name)
    if family == "synthetic":
        if image_size is None:
            raise ValueError(f"{name} is rendered at the input size: pass get_source(..., image_size=S)")
        return _module(family).get_source(name, split, image_size=image_size)
    return _module(family).get_source(name, split, data_dir=data_dir)


def make_dataset(name: str, split: str, *, batch_size: int, image_size: int, train: bool,
                 seed: int = 0, normalization: str = "minus_one_one", interpolation: str = "bicubic",
                 hflip: bool = False, random_resized_crop: bool = False, data_dir: str | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 start_batch: int = 0, drop_remainder: bool | None = None, prefetch: int = 2,
                 crop_fraction: float | None | str = "default", num_workers: int | None = None,
                 source: Any = None, num_classes: int | None = None, cache: bool = False,
                 cache_dir: str | None = None, cache_max_gb: float = 4.0,
                 worker_processes: int | None = None, normalize: bool = True) -> BatchIterator:
    """Batches {"image": float32 (B, H, W, 3), "label": int32 (B,)} (+ "mask": float32 (B,) in eval);
    with `normalize=False` "image" is uint8 (B, H, W, 3) (see `jax_peft.data.pipeline`).

    Args:
      name, split: dataset name (module docstring) and split (e.g. "train800val200", "test").
      batch_size: per-process batch B (the global batch is B * process_count).
      image_size: output H = W.
      train: True -> infinite shuffled iterator with augmentation, drop_remainder defaults to True;
        False -> one pass in stored order, last batch padded, with "mask".
      seed: shuffling and augmentation seed.
      normalization: "minus_one_one" | "imagenet" | "zero_one".
      interpolation: "bicubic" | "bilinear" (PIL, antialiased).
      hflip, random_resized_crop: training augmentation.
      data_dir: TFDS data_dir, or the root of an image-folder export / list files.
      process_index, process_count: host sharding (default: jax.process_index() / process_count()).
      start_batch: index of the first batch to produce (resume).
      prefetch: batches prepared ahead by a background thread (0: synchronous).
      crop_fraction: "default" = the family's convention (VTAB: None = direct resize; FGVC and
        few-shot: 0.875 = resize to size/0.875 then centre crop, random crop when training).
      num_workers: decoding threads (default min(8, cpu count)).
      source: optional record source to use instead of the named dataset's (tests, custom data).
      num_classes: every label must lie in [0, num_classes), else `ExampleError` names the dataset,
        the label and the example (default: the dataset's class count; with `source`, unchecked).
      cache: read the split from the decoded cache (`jax_peft.data.cache`: decoded and resized once,
        then memory-mapped; bit-identical batches), building it on first use, when the split fits
        in `cache_max_gb` and its preprocessing allows (not random_resized_crop).
      cache_dir: where the cache lives (default: $JAX_PEFT_CACHE_DIR, else <data_dir>/jax_peft_cache,
        else ~/.cache/jax_peft/decoded).
      worker_processes: processes decoding what is not cached, and building the cache (whole
        batches each; same batches as 0). None: min(8, cpu count) for splits of >= 512 records, else 0.
      normalize: True: float32 images with `normalization` applied on the host. False: the uint8
        images, 4x smaller, for steps that normalize on the device (the training loop does:
        `jax_peft.data.preprocess.normalize_on_device`, bit-identical to the host's).
    """
    family, name = _split_name(name)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    mod = _module(family)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; use one of {NORMALIZATIONS}")
    if family == "synthetic":
        mod.check_augmentation(name, train=train, hflip=hflip, random_resized_crop=random_resized_crop)
    if source is None:
        source = get_source(name, split, data_dir=data_dir, image_size=image_size)
        if num_classes is None:
            num_classes = _class_count(name, data_dir=data_dir)
    if crop_fraction == "default":
        crop_fraction = mod.CROP_FRACTION
    transform = Preprocess(image_size=image_size, train=train, normalization=normalization,
                           interpolation=interpolation, hflip=hflip,
                           random_resized_crop=random_resized_crop, crop_fraction=crop_fraction)
    procs = _auto_processes(len(source)) if worker_processes is None else int(worker_processes)
    notes: list[str] = []
    if cache:
        from jax_peft.data import cache as cache_lib

        cached = cache_lib.open_cache(source, transform, dataset=name, split=split,
                                      cache_dir=cache_dir or cache_lib.default_cache_dir(data_dir),
                                      max_bytes=float(cache_max_gb) * 2**30, workers=procs, notes=notes)
        if cached is not None:
            source, procs = cached, 0  # reading the cache is cheaper than sending batches between processes
    plan = BatchPlan(len(source), batch_size=batch_size, train=train, seed=seed,
                     process_index=process_index, process_count=process_count,
                     drop_remainder=drop_remainder)
    it = BatchIterator(source, transform, plan, image_size=image_size, start_batch=start_batch,
                       prefetch=prefetch, num_workers=num_workers, num_classes=num_classes,
                       name=f"{name} split {split!r}", worker_processes=procs if prefetch > 0 else 0,
                       normalize=normalize)
    it.notes = notes  # what the decoded cache did (the training loop prints them)
    return it


def _auto_processes(num_records: int) -> int:
    """Decoding processes by default: min(8, cpu count) for splits of >= 512 records, else none."""
    cpus = os.cpu_count() or 1
    return min(8, cpus) if num_records >= 512 and cpus > 1 else 0


__all__ = ["vtab_tasks", "num_classes", "dataset_info", "make_dataset", "get_source", "BatchIterator",
           "BatchPlan", "DatasetUnavailableError", "ExampleError", "Preprocess"]
