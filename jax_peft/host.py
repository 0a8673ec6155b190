"""Host (CPU) memory allocator settings for XLA:CPU runs.

XLA:CPU allocates every executable's temporary buffers (saved activations, gradients: 1.8-3 GB for
a ViT-B/16 step at batch 8) with `malloc` on each call and frees them at the end. glibc serves such
large blocks with fresh `mmap`s and gives them back with `munmap`, so every step first-touches its
whole working set again: 0.4-0.7 million page faults and 1-3 s of kernel CPU time per ViT-B/16 step
on this project's 2-core benchmark machine, more for methods that keep more activations (RLRR's
weight-form step: 700k faults against full fine-tuning's 490k; FacT's extra side-path inputs).

`keep_freed_memory()` tells glibc to serve large blocks from its heap and keep freed memory for
reuse (`mallopt`: no mmap, never trim the heap's free top, one arena so the freed blocks of XLA's
worker threads are found again), which removes those faults when the same executables run again
and again. Measured on ViT-B/16, batch 8, every method's step and the yardsticks interleaved
(`python scripts/benchmark.py`; four runs with it against the last run without, `--system-malloc`):
faults per call 0.4-0.7 million -> 0, forward 2.07 -> 1.64-1.77 s, floor 4.15 -> 3.72-3.97 s,
full fine-tuning grads 5.48 -> 5.14-5.55 s, RLRR step 6.84 -> 5.30-5.73 s. The process keeps its
peak heap for its lifetime (as GPU/TPU runtimes do with their own allocators).

On by default in the training CLI (`python -m jax_peft.main`, before JAX's CPU backend starts) and
in `scripts/benchmark.py`; `JAX_PEFT_REUSE_FREED_MEMORY=0` (CLI) or `--system-malloc` (benchmark)
keeps glibc's defaults, e.g. on an accelerator host that should hand memory back to the OS. Any
program can call it first thing, or set the equivalent environment: `MALLOC_ARENA_MAX=1
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=18446744073709551615`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps (fewer brk calls)
# Never hand the heap's free top back. mallopt takes an int but glibc stores the trim threshold as a
# size_t, so -1 means SIZE_MAX; 2**31 - 1 would still trim after any free that leaves more than 2 GiB
# on top (RLRR's and FacT's ViT-B/16 steps at batch 8 have 2.4-3 GB of temporaries).
_TRIM_THRESHOLD = -1


def keep_freed_memory() -> bool:
    """Configures glibc malloc to keep and reuse freed memory (see the module docstring).

    Returns True when applied, False where it does not apply (not glibc: macOS, musl). Idempotent;
    call it early, before the first JAX computation (threads that already have their own malloc
    arena keep it).
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TOP_PAD, _TOP_PAD),
        (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)))
    return ok


def requested() -> bool:
    """False only when the environment opts out: `JAX_PEFT_REUSE_FREED_MEMORY=0` (or `false`, `no`)."""
    return os.environ.get("JAX_PEFT_REUSE_FREED_MEMORY", "1").strip().lower() not in ("0", "false", "no")


def page_faults() -> int:
    """Minor page faults of this process so far (for benchmarks: faults per call)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
