"""Host memory of loading a multi-GB Google `.npz` onto an fsdp mesh: eager vs streamed.

Writes a Google-format `.npz` of random float32 values for a named model (default ViT-L/16, 1.2 GB;
written one array at a time, so the writer never holds the file), then loads it in fresh
subprocesses on simulated CPU devices and reports each one's peak resident memory
(`resource.getrusage(...).ru_maxrss`) and wall time:

    eager      load_checkpoint(path) (every array in host memory), then put_sharded onto the mesh
               (what the training CLI did before the lazy reader)
    streamed   sharding.load_sharded(path, mesh): the lazy reader's CRC/finite pass over the file in
               16 MiB chunks, then each device's slice read from a memory map of the file
    streamed_noverify   the same without the verification pass (verify=False, on_nonfinite="ignore")

On CPU the devices' memory is host memory, so the sharded tree itself (`tree_bytes`) is part of every
peak: `overhead = peak - baseline - tree_bytes` is the copy the loader adds on top (baseline: the
process after importing JAX and building the mesh). The file is deleted afterwards.

    python scripts/benchmark_load.py --model ViT-L/16 --mesh 1,8 --json docs/benchmarks/load_vit_l16.json
    python scripts/benchmark_load.py --model ViT-L/16 --mesh 1,8 --scan --json docs/benchmarks/load_vit_l16_scan.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("eager", "streamed", "streamed_noverify")


def write_npz(path: str, model: str, layout: str = "vit_jax", seed: int = 0) -> int:
    """A Google-format `.npz` of random float32 values for `model`, written member by member (the
    pre-Linen names of vit_jax, or big_vision's scanned layout). Returns the number of parameters."""
    import numpy as np

    import jax_peft
    from jax_peft import checkpoint, paths

    shapes = paths.flatten(jax_peft.param_shapes(jax_peft.vit_config(model)))
    rng = np.random.default_rng(seed)
    if layout == "vit_jax":
        entries = {}
        for k, s in shapes.items():
            parts = k.split("/")
            if len(parts) > 2 and parts[1].startswith("encoderblock_"):
                parts[2] = checkpoint._TO_PRE_LINEN.get(parts[2], parts[2])
            entries["/".join(parts)] = tuple(s.shape)
    else:  # big_vision-scan: params/ prefix, blocks stacked on a leading depth axis, posemb without CLS
        depth = 1 + max(int(k.split("/")[1].split("_")[1]) for k in shapes if k.startswith("Transformer/encoderblock_"))
        entries = {}
        for k, s in shapes.items():
            if k.startswith("Transformer/encoderblock_"):
                if k.startswith("Transformer/encoderblock_0/"):
                    rest = k[len("Transformer/encoderblock_0/"):]
                    entries[f"params/Transformer/encoderblock/{rest}"] = (depth, *s.shape)
            elif k == "Transformer/posembed_input/pos_embedding":
                entries["params/pos_embedding"] = (1, s.shape[1] - 1, s.shape[2])
            else:
                entries[f"params/{k}"] = tuple(s.shape)
    count = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, shape in entries.items():
            arr = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
            with z.open(key + ".npy", "w", force_zip64=True) as f:  # exactly what numpy.savez does
                np.lib.format.write_array(f, arr, allow_pickle=False)
            count += arr.size
            del arr
    return count


def _rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(path: str, mode: str, mesh_shape: tuple[int, int], scan: bool = False) -> dict:
    """One load in this process (run in a fresh subprocess by `main`); `scan`: the blocks are stacked
    for a scanned model first, as the training CLI does with model.scan=True."""
    import jax

    import jax_peft
    from jax_peft import scan as scan_lib
    from jax_peft.train import sharding

    mesh = sharding.make_mesh(*mesh_shape)
    jax.block_until_ready(jax.device_put(0.0))
    baseline = _current_rss()
    t0 = time.perf_counter()
    kw = {} if mode != "streamed_noverify" else {"verify": False, "on_nonfinite": "ignore"}
    if scan:  # the training CLI's path: load, stack the blocks, place (lazy stacks stay lazy)
        params = scan_lib.stack_blocks(jax_peft.load_checkpoint(path, lazy=mode != "eager", **kw))
        specs = sharding.frozen_specs(params, mesh_shape[1], stacked_prefix=f"Transformer/{scan_lib.STACKED}/")
        placed = sharding.put_sharded(params, mesh, specs)
    elif mode == "eager":
        params = jax_peft.load_checkpoint(path)
        placed = sharding.put_sharded(params, mesh, sharding.frozen_specs(params, mesh_shape[1]))
    else:
        placed = sharding.load_sharded(path, mesh, **kw)
    jax.block_until_ready(placed)
    seconds = time.perf_counter() - t0
    leaves = jax.tree_util.tree_leaves(placed)
    per_device = sharding.bytes_per_device(placed)
    return {"mode": mode, "seconds": seconds, "peak_rss_bytes": _rss(), "baseline_rss_bytes": baseline,
            "rss_after_bytes": _current_rss(), "tree_bytes": sum(x.nbytes for x in leaves),
            "max_device_bytes": max(per_device.values()), "devices": len(per_device)}


def _run_child(path: str, mode: str, mesh: tuple[int, int], scan: bool) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={mesh[0] * mesh[1]}")
    code = (f"import json, sys; sys.path.insert(0, {os.path.join(ROOT, 'scripts')!r}); import benchmark_load as b; "
            f"print('RESULT' + json.dumps(b.child({path!r}, {mode!r}, {tuple(mesh)!r}, {scan!r})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[6:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-L/16")
    p.add_argument("--layout", default="vit_jax", choices=("vit_jax", "big_vision-scan"))
    p.add_argument("--mesh", default="1,8", help="data,fsdp (their product of simulated CPU devices)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--scan", action="store_true", help="stack the blocks (model.scan=True) before placing them")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the .npz is written (and deleted)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    mesh = tuple(int(x) for x in args.mesh.split(","))
    sys.path.insert(0, ROOT)
    import numpy as np

    import jax_peft
    from jax_peft import paths

    n = paths.count(jax_peft.param_shapes(jax_peft.vit_config(args.model)))
    free = shutil.disk_usage(args.dir).free
    if free < 3 * n * 4:
        sys.exit(f"{args.dir} has {free / 2**30:.1f} GiB free; the {args.model} file needs {n * 4 / 2**30:.1f} GiB "
                 "(with margin, 3x): pass --dir on a larger disk")
    fd, path = tempfile.mkstemp(dir=args.dir, suffix=".npz", prefix="benchmark_load_")
    os.close(fd)
    try:
        t0 = time.perf_counter()
        params = write_npz(path, args.model, args.layout)
        write_s = time.perf_counter() - t0
        size = os.path.getsize(path)
        print(f"wrote {path}: {args.model}, {params:,} parameters, {size / 2**30:.2f} GiB in {write_s:.0f} s")
        rows = []
        for mode in args.modes.split(","):
            r = _run_child(path, mode, mesh, args.scan)
            r["overhead_bytes"] = r["peak_rss_bytes"] - r["baseline_rss_bytes"] - r["tree_bytes"]
            rows.append(r)
            print(f"{mode:18} {r['seconds']:6.1f} s  peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB = baseline "
                  f"{r['baseline_rss_bytes'] / 2**30:.2f} + tree {r['tree_bytes'] / 2**30:.2f} + overhead "
                  f"{r['overhead_bytes'] / 2**30:5.2f} GiB  (largest device {r['max_device_bytes'] / 2**20:.0f} MiB)")
    finally:
        os.unlink(path)
    out = {"model": args.model, "layout": args.layout, "scan": args.scan, "parameters": params, "file_bytes": size,
           "mesh": {"data": mesh[0], "fsdp": mesh[1]}, "numpy": np.__version__, "results": rows}
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
