"""Decoded cache: each split decoded and resized once into a memory-mapped uint8 array, read every epoch.

The recipes here have no random crop before the resize (VTAB: resize to 224; FGVC / few-shot eval
and RLRR FGVC training: resize to 256, then a centre or random 224 crop), so `Preprocess.prepare`
(decode, RGB, resize to `stored_size`) gives the same uint8 image every epoch. `open_cache` stores
it for a whole split under

    <cache_dir>/<dataset>/<split>_<S>px_<interpolation>_<key>/{images.npy, labels.npy, meta.json}

(images uint8 (N, S, S, 3), memory-mapped on read; labels int64 (N,); recipes with flips add
`mirrored.npy`, the flipped images, so a flip is a plain read), where `key` hashes the
dataset, split, S, resize method, this module's format version and a fingerprint of the source's
content (list files and each image file's size and mtime, or the TFDS array_record files; plus the
decoded pixels and labels of a few records). A changed key builds a new entry (and removes the
stale ones of the same dataset, split, size and resize method). Writes are atomic (a temporary
directory renamed into place). The crop, flip and normalization stay per example and are drawn
from the same per-example rngs, so batches are bit-identical with and without the cache
(`tests/test_data_cache.py`), and resume is unchanged (the cache only replaces the record source).

Not cached: training with `random_resized_crop` (its crop box depends on the original image),
sources with no fingerprint (custom objects without `cache_fingerprint()`), and splits larger than
`max_bytes`; those decode every epoch (in worker processes: `worker_processes`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_MAX_GB = 4.0
_SAMPLES = 4  # records whose decoded pixels and labels enter the key


def default_cache_dir(data_dir: str | None) -> str:
    """`$JAX_PEFT_CACHE_DIR`, else `<data_dir>/jax_peft_cache`, else `~/.cache/jax_peft/decoded`."""
    if os.environ.get("JAX_PEFT_CACHE_DIR"):
        return os.environ["JAX_PEFT_CACHE_DIR"]
    if data_dir:
        return os.path.join(data_dir, "jax_peft_cache")
    return os.path.join(os.path.expanduser("~"), ".cache", "jax_peft", "decoded")


# --- fingerprints ---------------------------------------------------------------------------------
def _file_stats(root: str, paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(os.path.join(root, p))
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def source_fingerprint(source: Any) -> Any:
    """JSON-able description of a record source's content, or None when it is not known how to
    describe it (then it is not cached). Sources may define `cache_fingerprint()` themselves."""
    own = getattr(source, "cache_fingerprint", None)
    if callable(own):
        return {"type": type(source).__name__, "own": own()}
    name = type(source).__name__
    if hasattr(source, "dataset_info") and hasattr(source, "split"):  # tfds.data_source
        info = source.dataset_info
        d = getattr(info, "data_dir", None) or ""
        files = sorted(f for f in os.listdir(d)) if d and os.path.isdir(d) else []
        return {"type": "tfds", "name": info.full_name, "split": str(source.split), "len": len(source),
                "files": _file_stats(d, files)}
    if hasattr(source, "paths") and (hasattr(source, "image_root") or hasattr(source, "image_dir")):
        root = getattr(source, "image_root", None) or source.image_dir
        labels = np.asarray(getattr(source, "labels", []), np.int64)
        list_file = getattr(source, "list_file", None)
        listed = None
        if list_file:
            with open(list_file, "rb") as f:
                listed = hashlib.sha256(f.read()).hexdigest()
        return {"type": name, "root": os.path.abspath(root), "len": len(source.paths),
                "list": listed,
                "labels": hashlib.sha256(labels.tobytes()).hexdigest(),
                "files": _file_stats(root, source.paths)}
    if hasattr(source, "sources"):  # ConcatSource
        parts = [source_fingerprint(s) for s in source.sources]
        return None if any(p is None for p in parts) else {"type": name, "parts": parts}
    if hasattr(source, "records"):  # task / label wrappers over TFDS records
        inner = source_fingerprint(source.records)
        if inner is None:
            return None
        task = getattr(source, "task", None)
        indices = getattr(source, "indices", None)
        return {"type": name, "task": getattr(task, "name", None), "inner": inner,
                "indices": None if indices is None else
                hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()}
    return None


def _sample_digest(source: Sequence, prepare) -> str:
    """Hash of the prepared pixels and labels of a few evenly spaced records."""
    n = len(source)
    h = hashlib.sha256()
    for i in sorted({int(round(j * (n - 1) / max(_SAMPLES - 1, 1))) for j in range(min(_SAMPLES, n))}):
        ex = source[i]
        h.update(np.ascontiguousarray(prepare(ex["image"])).tobytes())
        h.update(str(int(ex["label"])).encode())
    return h.hexdigest()


# --- the cache ------------------------------------------------------------------------------------
class DecodedCache:
    """A cached split: `len`, `[i] -> {"image": uint8 (S, S, 3), "label": int}` and
    `load_examples(indices, rngs, transform)` -> (uint8 (n, size, size, 3), labels (n,)) through
    `transform.augment` (crop, flip) per example. Flipped examples are read from a mirrored copy
    (`mirrored.npy`, written beside the images the first time a flipping recipe reads the entry):
    a flip is then a gather like any other read instead of a slow copy of 3-byte pixels."""

    def __init__(self, directory: str):
        self.directory = directory
        self.images = np.load(os.path.join(directory, "images.npy"), mmap_mode="r")
        self.labels = np.load(os.path.join(directory, "labels.npy"))
        self.nbytes = int(self.images.nbytes)
        self.mirrored: np.ndarray | None = None

    def mirror(self) -> np.ndarray:
        """The horizontally flipped images (N, S, S, 3), memory-mapped; written atomically once."""
        if self.mirrored is None:
            path = os.path.join(self.directory, "mirrored.npy")
            if not os.path.isfile(path):
                tmp = f"{path}.tmp{os.getpid()}"
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=self.images.shape)
                for s in range(0, len(self), 256):
                    out[s:s + 256] = self.images[s:s + 256, :, ::-1]
                out.flush()
                del out
                os.replace(tmp, path)
            self.mirrored = np.load(path, mmap_mode="r")
        return self.mirrored

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": np.asarray(self.images[int(index)]), "label": int(self.labels[int(index)])}

    def load_examples(self, indices: np.ndarray, rngs: list, transform) -> tuple[np.ndarray, np.ndarray]:
        """`transform.augment` of records `indices` (with `rngs`), batched: gathers from the memory
        maps (flip(crop(x, top, left)) = crop(flip(x), top, S - left - size))."""
        indices = np.asarray(indices, np.int64)
        params = [transform.augment_params(g) for g in rngs]
        flips = np.asarray([p[2] for p in params], bool)
        mirrored = self.mirror() if flips.any() else None
        s, size = self.images.shape[1], transform.image_size
        out = np.empty((len(indices), size, size, 3), np.uint8)
        if s == size:  # no crop: one gather per orientation from the page cache
            out[~flips] = self.images[indices[~flips]]
            if mirrored is not None:
                out[flips] = mirrored[indices[flips]]
        else:
            for j, (i, (top, left, flip)) in enumerate(zip(indices, params)):
                out[j] = (mirrored[i, top:top + size, s - left - size:s - left] if flip else
                          self.images[i, top:top + size, left:left + size])
        return out, self.labels[indices]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _prepare_chunk(state: tuple, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
    source, prepare = state
    out = [source[i] for i in indices]
    return (np.stack([prepare(ex["image"]) for ex in out]),
            np.asarray([int(ex["label"]) for ex in out], np.int64))


class _Chunks:
    """`prepare_chunk(indices)` in a worker process (ProcessMap state)."""

    def __init__(self, source: Sequence, prepare):
        self.source, self.prepare = source, prepare

    def prepare_chunk(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return _prepare_chunk((self.source, self.prepare), indices)


def _build(directory: str, source: Sequence, transform, size: int, meta: dict, workers: int) -> None:
    """Decodes the split into `directory` atomically (a temporary sibling directory renamed)."""
    n = len(source)
    tmp = f"{directory}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        images = np.lib.format.open_memmap(os.path.join(tmp, "images.npy"), mode="w+", dtype=np.uint8,
                                           shape=(n, size, size, 3))
        labels = np.zeros((n,), np.int64)
        chunk = 32
        starts = range(0, n, chunk)
        if workers > 1:
            from jax_peft.data.workers import ProcessMap

            with ProcessMap(_Chunks, (source, transform.prepare), "prepare_chunk", workers) as pm:
                results = pm.imap(list(range(s, min(s + chunk, n))) for s in starts)
                for s, (im, lab) in zip(starts, results):
                    images[s:s + len(lab)], labels[s:s + len(lab)] = im, lab
        else:
            for s in starts:
                im, lab = _prepare_chunk((source, transform.prepare), list(range(s, min(s + chunk, n))))
                images[s:s + len(lab)], labels[s:s + len(lab)] = im, lab
        images.flush()
        del images
        np.save(os.path.join(tmp, "labels.npy"), labels)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished the same entry first: keep theirs
            if not os.path.isfile(os.path.join(directory, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_cache(source: Sequence, transform, *, dataset: str, split: str, cache_dir: str,
               max_bytes: float = DEFAULT_MAX_GB * 2**30, workers: int = 0,
               notes: list[str] | None = None) -> DecodedCache | None:
    """The decoded cache of (dataset, split) for `transform` (a `Preprocess`), built on first use
    (`workers` > 1: in that many processes), or None when the split is not cacheable. What happened
    is logged (INFO) and appended to `notes`."""

    def say(msg: str, *args) -> None:
        log.info(msg, *args)
        if notes is not None:
            notes.append(msg % args)

    size = transform.stored_size
    where = f"{dataset} {split}"
    if size is None:
        say("decoded cache not used for %s: random_resized_crop draws its crop from the "
                 "original image", where)
        return None
    nbytes = len(source) * size * size * 3
    copies = 2 if transform.train and transform.hflip else 1  # + the mirrored copy for flips
    if nbytes * copies > max_bytes:
        say("decoded cache not used for %s: %d images at %d px%s would take %.2f GB, over the "
            "limit of %.2f GB (data.cache_max_gb)", where, len(source), size,
            " (and their mirror images, for flips)" if copies == 2 else "", nbytes * copies / 2**30,
            max_bytes / 2**30)
        return None
    fp = source_fingerprint(source)
    if fp is None:
        say("decoded cache not used for %s: no fingerprint for a %s source (define "
                 "cache_fingerprint())", where, type(source).__name__)
        return None
    meta = {"format": FORMAT_VERSION, "dataset": dataset, "split": split, "size": size,
            "interpolation": transform.interpolation, "num_examples": len(source), "source": fp,
            "samples": _sample_digest(source, transform.prepare)}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    prefix = f"{_slug(split)}_{size}px_{transform.interpolation}_"
    parent = os.path.join(cache_dir, _slug(dataset))
    directory = os.path.join(parent, prefix + key)
    if os.path.isfile(os.path.join(directory, "meta.json")):
        cache = DecodedCache(directory)
        say("decoded cache for %s: reading %d images at %d px, %.1f MB, from %s", where, len(cache),
            size, cache.nbytes / 2**20, directory)
        return cache
    os.makedirs(parent, exist_ok=True)
    t0 = time.perf_counter()
    _build(directory, source, transform, size, meta, workers)
    say("decoded cache for %s built in %.1f s (%d decoding process(es)): %d images at %d px, %.1f MB "
        "in %s", where, time.perf_counter() - t0, max(workers, 1), len(source), size, nbytes / 2**20,
        directory)
    for stale in os.listdir(parent):
        if stale.startswith(prefix) and stale != prefix + key and ".tmp" not in stale:
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
            say("decoded cache: removed the stale entry %s", os.path.join(parent, stale))
    return DecodedCache(directory)
