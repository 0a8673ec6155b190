"""Deterministic batching over a random-access source, with host sharding and background prefetch.

A *source* is any random-access sequence: `len(source)` and `source[i] -> {"image": uint8 (H, W, C),
"label": int}` (a TFDS data source wrapped by the task's decoding, an image-folder list, ...).

Training order (identical on every host, independent of how often the iterator was restarted):

    global batch  G = batch_size * process_count
    epoch e       = permutation of range(N) drawn from np.random.default_rng([seed, e])
    batch k       = epoch k // S, slots [j*G, (j+1)*G) of that permutation, j = k % S
                    (S = N // G with drop_remainder, else ceil(N / G); the last one is smaller)
    host p        takes slots [p*B, (p+1)*B) of the global batch (B = batch_size)
    augmentation  of example i in epoch e uses np.random.default_rng([seed, e, i, 1])

so `start_batch=k` yields exactly the batches an uninterrupted iterator yields from its k-th on,
which is what bit-exact resume needs.

Evaluation: one pass in stored order; global batch j holds records [j*G, (j+1)*G), host p its slots
[p*B, (p+1)*B); slots past the end are zero images with `mask` 0, so every batch has the static
shape (B, H, W, 3) and accuracy = sum(correct * mask) / sum(mask) is exact.

Batch contract: {"image": (B, H, W, 3), "label": int32 (B,)} plus "mask": float32 (B,) in eval (and in
training with drop_remainder=False). `normalize=True` (the default of `BatchIterator` and
`jax_peft.data.make_dataset`, for notebooks and custom loops): "image" is float32, normalized by the
recipe (`Preprocess.normalize`). `normalize=False` (what the training loop asks for): "image" is the
uint8 output of the per-example stage, 4x fewer bytes through worker pipes and host-to-device copies;
the jitted train and eval steps normalize it on the device (`preprocess.normalize_on_device`, the same
bits; `jax_peft.train.step.make_runner(normalization=...)`). Padded slots are zero images in the
batch's dtype either way (masked out).

Work: with a staged transform (`Preprocess`), each example goes through `geometry` (decode, resize,
crop, flip: uint8) and whole batches through `normalize` (skipped with normalize=False); a source
with `load_examples` (the decoded cache, `jax_peft.data.cache`) does the per-example stage for a
batch at once. Batch k is a pure function of k, so worker processes (`worker_processes`) can each
compute whole batches and the result is bit-identical to a single thread's. Workers send the uint8
examples back (a batch of 32 at 224 px: 4.6 MB); the normalization, if any, runs in the parent.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

Batch = dict[str, np.ndarray]
Transform = Callable[[np.ndarray, "np.random.Generator | None"], np.ndarray]


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of epoch `epoch` (int64 (N,)); the same on every host and every run."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Augmentation randomness of example `index` in epoch `epoch`: `default_rng([seed, epoch, index, 1])`.

    Values in [0, 2**32) are passed as one uint32 array, which seeds the same stream (numpy turns each
    such int into one uint32 word) at two thirds of the list's cost (the cached read path makes
    one generator per image)."""
    entropy = [int(seed), int(epoch), int(index), 1]
    if all(0 <= v < 2**32 for v in entropy):
        return np.random.default_rng(np.asarray(entropy, np.uint32))
    return np.random.default_rng(entropy)


class BatchPlan:
    """Which source records (and which augmentation epoch) make up each per-host batch."""

    def __init__(self, num_examples: int, *, batch_size: int, train: bool, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, drop_remainder: bool | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
        if num_examples <= 0:
            raise ValueError("the dataset split is empty")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.drop_remainder = train if drop_remainder is None else bool(drop_remainder)
        self.global_batch = batch_size * process_count
        g, n = self.global_batch, num_examples
        if self.drop_remainder:
            self.batches_per_epoch = n // g
            if self.batches_per_epoch == 0:
                raise ValueError(
                    f"the split has {n} examples, fewer than one global batch of {g} "
                    f"(batch_size {batch_size} x {process_count} processes); lower batch_size or "
                    "pass drop_remainder=False")
        else:
            self.batches_per_epoch = math.ceil(n / g)
            rest = n - (self.batches_per_epoch - 1) * g
            if train and rest % process_count:
                raise ValueError(
                    f"the last training batch has {rest} examples, which cannot be split evenly over "
                    f"{process_count} processes; pass drop_remainder=True")
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def num_batches(self) -> int | None:
        """Batches in the iterator: None for training (infinite), else one pass."""
        return None if self.train else self.batches_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = epoch_permutation(self.num_examples, self.seed, epoch)
            self._perm_epoch = epoch
        return self._perm

    def train_batch(self, k: int) -> tuple[np.ndarray, int]:
        """(record indices of this host's part of global batch k, epoch)."""
        epoch, j = divmod(k, self.batches_per_epoch)
        g = self._permutation(epoch)[j * self.global_batch:(j + 1) * self.global_batch]
        per_host = len(g) // self.process_count
        p = self.process_index
        return g[p * per_host:(p + 1) * per_host], epoch

    def eval_batch(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(record indices (B,), mask float32 (B,)); padded slots point at record 0 with mask 0."""
        start = j * self.global_batch + self.process_index * self.batch_size
        pos = start + np.arange(self.batch_size)
        valid = pos < self.num_examples
        return np.where(valid, pos, 0), valid.astype(np.float32)


def _worker_iterator(source: Sequence, transform: Transform, plan: BatchPlan, image_size: int,
                     num_classes: int | None, name: str) -> BatchIterator:
    """A worker process's synchronous copy of an iterator (see `worker_processes`; it only computes
    `batch_examples`, which normalization does not touch)."""
    return BatchIterator(source, transform, plan, image_size=image_size, prefetch=0, num_workers=1,
                         num_classes=num_classes, name=name)


class BatchIterator:
    """Iterator of batches {"image": (B, H, W, 3), "label": int32 (B,)[, "mask": float32 (B,)]}: "image"
    float32 normalized by `transform.normalize` (`normalize=True`), or as the per-example stage gives
    it (`normalize=False`: uint8 for a `Preprocess`, to be normalized on the device).

    Batches are produced by a background thread (`prefetch` batches ahead; 0 = synchronous) whose
    examples are decoded and transformed by a small thread pool, or, with `worker_processes` > 0,
    by that many spawned processes each computing whole batches (source and transform must then be
    picklable; prefetch must be > 0). `stats` holds running totals:
    `batches` yielded, `wait_s` spent blocked in `next()` (input-bound time as seen by the step
    loop), `load_s` spent producing batches. `steps_per_epoch` and `num_batches` describe the plan.
    """

    def __init__(self, source: Sequence, transform: Transform, plan: BatchPlan, *,
                 image_size: int, start_batch: int = 0, prefetch: int = 2,
                 num_workers: int | None = None, num_classes: int | None = None, name: str = "dataset",
                 worker_processes: int = 0, normalize: bool = True):
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.source, self.transform, self.plan = source, transform, plan
        self.num_classes, self.name = num_classes, name  # labels are checked against num_classes
        self.image_size = image_size
        self.normalize = bool(normalize)
        self.steps_per_epoch = plan.batches_per_epoch
        self.num_batches = plan.num_batches
        self.stats: dict[str, float] = {"batches": 0, "wait_s": 0.0, "load_s": 0.0}
        self._next_k = start_batch
        workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
        self._pool = (concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jax_peft_data")
                      if workers > 1 else None)
        self._stop = threading.Event()
        self._procs = None
        if worker_processes > 0:
            if prefetch <= 0:
                raise ValueError("worker_processes needs prefetch > 0 (the batches come from a background thread)")
            from jax_peft.data.workers import ProcessMap

            self._procs = ProcessMap(_worker_iterator, (source, transform, plan, image_size, num_classes, name),
                                     "batch_examples", worker_processes)
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._produce, args=(start_batch,), daemon=True,
                                            name="jax_peft_prefetch")
            self._thread.start()

    # --- producing ------------------------------------------------------------------------------
    def _load_one(self, index: int, rng: np.random.Generator | None, stage: Transform) -> tuple[np.ndarray, int]:
        try:
            ex = self.source[int(index)]
            image = stage(ex["image"], rng)
        except ExampleError:  # the source named the dataset and the example already (e.g. a bad label)
            raise
        except Exception as e:  # noqa: BLE001 - name the dataset and the example of any read/decode error
            raise ExampleError(f"{self.name}, example {int(index)}: {type(e).__name__}: {e}") from e
        label = int(ex["label"])
        self._check_label(int(index), label)
        return image, label

    def _check_label(self, index: int, label: int) -> None:
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            where = getattr(self.source, "describe", lambda i: "")(int(index))
            raise label_error(self.name, int(index), label, self.num_classes, where)

    def _map(self, fn, *iterables):
        return list(self._pool.map(fn, *iterables)) if self._pool else list(map(fn, *iterables))

    def _examples(self, indices: np.ndarray, rngs: list) -> tuple[np.ndarray, np.ndarray]:
        """(images (n, H, W, 3), int32 labels (n,)) of records `indices` after the per-example stage:
        uint8 for a staged transform (`geometry`), the transform's output for any other callable."""
        load_examples = getattr(self.source, "load_examples", None)
        if load_examples is not None and hasattr(self.transform, "augment"):
            images, labels = load_examples(indices, rngs, self.transform)
            for i, label in zip(indices, labels):  # the cache stores the source's labels unchecked
                self._check_label(int(i), int(label))
            return images, np.asarray(labels, np.int32)
        stage = getattr(self.transform, "geometry", self.transform)
        out = self._map(lambda i, g: self._load_one(i, g, stage), indices, rngs)
        if not out:
            s = self.image_size
            return np.zeros((0, s, s, 3), np.uint8), np.zeros((0,), np.int32)
        return np.stack([o[0] for o in out]), np.asarray([o[1] for o in out], np.int32)

    def batch_examples(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The real examples of batch k before normalization (what worker processes compute)."""
        plan, seed = self.plan, self.plan.seed
        if plan.train:
            idx, epoch = plan.train_batch(k)
            return self._examples(idx, [example_rng(seed, epoch, i) for i in idx])
        idx, mask = plan.eval_batch(k)
        real = idx[mask > 0]  # real slots come first
        return self._examples(real, [None] * len(real))

    def load_batch(self, k: int, examples: tuple[np.ndarray, np.ndarray] | None = None) -> Batch:
        """Batch k of the plan (pure function of k; `examples` = `batch_examples(k)` if computed elsewhere)."""
        t0 = time.perf_counter()
        plan = self.plan
        images, labels = self.batch_examples(k) if examples is None else examples
        norm = getattr(self.transform, "normalize", None) if self.normalize else None
        images = norm(images) if norm is not None else images
        images = np.asarray(images)
        if self.normalize:
            images = images.astype(np.float32, copy=False)
        n, pad = len(labels), plan.batch_size - len(labels)
        if plan.train:
            batch = {"image": images, "label": labels}
            if not plan.drop_remainder:  # static shapes: pad the epoch's last batch and mask it
                batch = {"image": np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)]),
                         "label": np.concatenate([labels, np.zeros((pad,), np.int32)]),
                         "mask": np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])}
        else:
            s = self.image_size
            image = np.zeros((plan.batch_size, s, s, 3), images.dtype)
            label = np.zeros((plan.batch_size,), np.int32)
            image[:n], label[:n] = images, labels
            batch = {"image": image, "label": label, "mask": plan.eval_batch(k)[1]}
        self.stats["load_s"] += time.perf_counter() - t0
        return batch

    def _batches(self, k: int) -> Iterator[Batch]:
        """Batches k, k+1, ... (to the end of an eval pass) in order, from this thread or the workers."""
        ks = itertools.count(k) if self.num_batches is None else range(k, self.num_batches)
        if self._procs is None:
            yield from map(self.load_batch, ks)
            return
        window = (self._queue.maxsize if self._queue is not None else 0) + self._procs.workers
        t0 = time.perf_counter()
        for j, examples in enumerate(self._procs.imap(ks, window, self._stop)):
            self.stats["load_s"] += time.perf_counter() - t0  # waiting for the workers
            yield self.load_batch(k + j, examples)
            t0 = time.perf_counter()

    def _done(self, k: int) -> bool:
        return self.num_batches is not None and k >= self.num_batches

    def _produce(self, k: int) -> None:
        try:
            for item in self._batches(k):
                if self._stop.is_set():
                    break
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
            self._put_final(StopIteration())
        except BaseException as e:  # re-raised in the consumer
            self._put_final(e)
        finally:
            if self._procs is not None:  # done or stopped: release the worker processes
                self._procs.close()

    def _put_final(self, item: BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # --- consuming ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        t0 = time.perf_counter()
        if self._queue is None:
            if self._done(self._next_k):
                self.close()
                raise StopIteration
            item = self.load_batch(self._next_k)
        else:
            if self._stop.is_set():
                raise StopIteration
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()  # the producer has finished: release its thread and the worker pool
                if isinstance(item, StopIteration):
                    raise StopIteration
                raise item
        self._next_k += 1
        self.stats["batches"] += 1
        self.stats["wait_s"] += time.perf_counter() - t0
        return item

    @property
    def next_batch(self) -> int:
        """Index of the batch the next `next()` returns (save it to resume with `start_batch`)."""
        return self._next_k

    def close(self) -> None:
        """Stops the background thread and the worker pool."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._procs is not None:
            self._procs.close()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._stop.set()
        except Exception:
            pass


class ExampleError(ValueError):
    """An example could not be read, decoded or has an invalid label; names the dataset and index."""


def label_error(name: str, index: int, label: int, num_classes: int, where: str = "",
                fix: str = "Fix the label (or the dataset's class count)") -> ExampleError:
    """The error for a label outside [0, num_classes): names the dataset (and split), the example,
    where it came from, the label and `fix`."""
    return ExampleError(
        f"{name}, example {index}{f' ({where})' if where else ''}: label {label} is outside [0, {num_classes}) "
        f"for a dataset of {num_classes} classes; training on it would give a wrong loss silently. {fix}")


class DatasetUnavailableError(RuntimeError):
    """The dataset is known but not present in a usable form (not prepared, files missing)."""


def tfds_source(spec: str, split: str, data_dir: str | None, *, prepare_name: str,
                manual_note: str = "") -> Sequence:
    """`tfds.data_source(spec, split=split, data_dir=data_dir)` without triggering a download.

    Raises DatasetUnavailableError naming the fix (`python -m jax_peft.data.prepare NAME`) when the
    dataset is not prepared in array_record format under `data_dir`.
    """
    import tensorflow_datasets as tfds  # imported lazily: slow, and not needed for folder data

    try:
        return tfds.data_source(spec, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises several unrelated types for "not prepared"
        where = data_dir or "the TFDS default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
        dd = f" --data_dir {data_dir}" if data_dir else ""
        raise DatasetUnavailableError(
            f"TFDS dataset {spec!r} (split {split!r}) is not available in array_record format under "
            f"{where}.\nPrepare it once with: python -m jax_peft.data.prepare {prepare_name}{dd}\n"
            f"{(manual_note + chr(10)) if manual_note else ''}(A copy prepared in TFRecord format cannot be "
            f"read without TensorFlow: prepare into another data_dir.)\n(TFDS said: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})") from e
