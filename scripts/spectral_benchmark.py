"""Wall time of the spectral lens on ViT-B/16 shapes (random weights), CPU.

    python scripts/spectral_benchmark.py                 # ViT-B/16, k = 8, LoRA-like rank-8 increments
    python scripts/spectral_benchmark.py --model ViT-S/16 --repeats 2
    OPENBLAS_NUM_THREADS=1 python scripts/spectral_benchmark.py   # on a busy/shared machine

jax's CPU SVD calls LAPACK (scipy's OpenBLAS). On a machine where other processes hold the cores,
OpenBLAS's spinning worker threads can make the same SVD 10-50x slower and wildly variable; with
OPENBLAS_NUM_THREADS=1 the timings are steady.

Measures `jax_peft.analysis.compare(base, adapted)` (the 72 matrices of a 12-block ViT: per matrix the
SVD of W and W' with vectors, the singular values of ΔW and the top-k principal angles), first call
(compile + run) and warm calls, and the share spent in the raw batched SVDs alone. Random weights
have the same cost as trained ones; nothing here depends on values.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jax_peft import paths, vit  # noqa: E402
from jax_peft import sites as layers  # noqa: E402
from jax_peft.analysis import spectral  # noqa: E402


def random_tree(cfg: vit.ViTConfig, seed: int) -> dict:
    shapes = vit.param_shapes(cfg)
    flat = paths.flatten(shapes)
    rng = np.random.default_rng(seed)
    return paths.unflatten({p: (0.02 * rng.standard_normal(s.shape)).astype(np.float32) for p, s in flat.items()})


def low_rank_update(params: dict, rank: int, seed: int) -> dict:
    """Every q..fc2 matrix gets a rank-`rank` increment (like a LoRA on all modules)."""
    rng = np.random.default_rng(seed)
    updates = {}
    for i in range(layers.num_blocks(params)):
        for m in layers.MODULES:
            path = f"{layers.module_path(i, m)}/kernel"
            k = np.asarray(paths.get(params, path))
            w = np.asarray(layers.matrix_view(jnp.asarray(k), m))
            d = 0.01 * rng.standard_normal((w.shape[0], rank)) @ rng.standard_normal((rank, w.shape[1]))
            updates[path] = (w + d).astype(np.float32).reshape(k.shape)
    return paths.replace(params, updates)


def timed(fn):
    """(wall seconds, process CPU seconds, result). CPU time is the steadier number on a shared
    machine; wall ≈ CPU / threads when the machine is otherwise idle."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()  # compare() returns host numpy arrays, so it has finished
    return time.perf_counter() - t, time.process_time() - c, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B/16")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    cfg = vit.vit_config(a.model, num_classes=10)
    base = random_tree(cfg, 0)
    adapted = low_rank_update(base, a.rank, 1)
    print(f"{a.model}: {cfg.num_layers} blocks x 6 matrices, D={cfg.hidden_size}, M={cfg.mlp_dim}, "
          f"k={a.k}; devices: {jax.devices()}; cpu count: {os.cpu_count()}; "
          f"load average: {os.getloadavg()[0]:.1f}")
    for k in (a.k, 0):
        wall, cpu, spectra = timed(lambda: spectral.compare(base, adapted, k=k))
        print(f"compare k={k}, first call (compile + run): wall {wall:.2f} s, cpu {cpu:.2f} s")
        for _ in range(a.repeats):
            wall, cpu, _ = timed(lambda: spectral.compare(base, adapted, k=k))
            print(f"compare k={k}, warm call: wall {wall:.2f} s, cpu {cpu:.2f} s")
        rank = {m: int(s.delta_rank.max()) for m, s in spectra.items()}
        print(f"  max numerical rank of ΔW per module (expect {a.rank}): {rank}")
    print(f"load average now: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
