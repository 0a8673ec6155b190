"""Worker processes for the input pipeline: an ordered map over a pool of spawned processes.

Decoding and resizing JPEGs is CPU-bound Python/PIL work; threads only overlap the parts of it that
release the GIL, so decoding scales with worker processes instead. Each worker builds its own state
once (`factory(*args)`, e.g. a synchronous `BatchIterator` over a picklable source) and then answers
`getattr(state, method)(item)` calls; results come back in submission order, at most `window` in
flight. Workers are spawned, not forked: the parent usually runs JAX, whose threads make `fork`
unsafe.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_STATE: Any = None


def _init(factory: Callable[..., Any], args: tuple) -> None:
    global _STATE
    _STATE = factory(*args)


def _call(method: str, item: Any) -> Any:
    return getattr(_STATE, method)(item)


class ProcessMap:
    """`imap(items)` = (getattr(state, method)(item) for item in items), computed by `workers` spawned
    processes that each hold `state = factory(*args)`. `factory`, `args` and the results must be
    picklable (module-level functions, plain data, numpy arrays)."""

    def __init__(self, factory: Callable[..., Any], args: tuple, method: str, workers: int):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.method, self.workers = method, workers
        self._pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
            initargs=(factory, args))

    def imap(self, items: Iterable, window: int | None = None,
             stop: threading.Event | None = None) -> Iterator:
        """Results in the order of `items` (which may be infinite); `window` calls in flight (default
        2 per worker). Stops early when `stop` is set."""
        window = max(1, window or 2 * self.workers)
        pending: collections.deque = collections.deque()
        it = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(pending) < window and not (stop and stop.is_set()):
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append(self._pool.submit(_call, self.method, item))
            if not pending or (stop and stop.is_set()):
                return
            yield pending.popleft().result()

    def close(self) -> None:
        """Cancels what has not started; the workers exit after their current call."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ProcessMap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
