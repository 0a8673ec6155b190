"""Per-chip memory of PEFT on the largest Google ViTs, with the frozen backbone sharded over fsdp.

Two parts:

1. Arithmetic from `jax.eval_shape` (no arrays are allocated, any model size): frozen float32 bytes
   divided by fsdp, plus the replicated trainable state (adapter + head, and AdamW's two moments).

       python scripts/fsdp_memory.py --models ViT-g/14,ViT-G/14 --methods lora,rlrr,fact_tt \\
           --fsdp 1,4,8,16 --json OUT.json

2. `--compile MODEL`: compiles the real train step on a simulated (data, fsdp) CPU mesh and reports
   XLA's per-device memory figures and the collectives in the compiled program (nothing is run):

       python scripts/fsdp_memory.py --compile ViT-B/16 --mesh 2,4 --method lora --batch 16 --scan

Activation memory is not in part 1: it depends on batch, resolution and remat; part 2 measures it for
a given setting (`temp` bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ViT-B/16,ViT-L/16,ViT-H/14,ViT-So400m/14,ViT-g/14,ViT-g-opt/16,ViT-G/14")
    p.add_argument("--methods", default="linear,lora,fact_tt,rlrr,full")
    p.add_argument("--fsdp", default="1,4,8,16")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--compile", metavar="MODEL", help="compile one train step of MODEL on a simulated mesh")
    p.add_argument("--mesh", default="2,4", help="data,fsdp for --compile (their product of CPU devices)")
    p.add_argument("--method", default="lora", help="method for --compile")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--scan", action="store_true", help="--compile the scanned encoder (one gather per layer)")
    p.add_argument("--remat", action="store_true",
                   help="--compile with rematerialized blocks (gathered weights are not kept for the backward)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def arithmetic(models: list[str], methods: list[str], fsdps: list[int], num_classes: int,
               image_size: int) -> list[dict]:
    """Bytes per chip for each (model, method, fsdp), float32 parameters and AdamW state."""
    import jax

    import jax_peft
    from jax_peft import paths
    from jax_peft.train import sharding

    rows = []
    for name in models:
        cfg = jax_peft.vit_config(name, num_classes=num_classes, image_size=image_size)
        shapes = jax_peft.param_shapes(cfg)
        frozen = {k: v for k, v in shapes.items() if k != "head"}
        head = paths.count(shapes["head"])
        for method_name in methods:
            method = jax_peft.get_method(method_name)
            try:
                adapter = jax.eval_shape(lambda p: method.init(jax.random.PRNGKey(0), p), shapes)
            except ValueError as e:  # e.g. FacT needs an MLP width that is a multiple of the width
                rows.append({"model": name, "method": method_name, "unsupported": str(e).split(";")[0]})
                continue
            trainable = method.num_params(adapter) + head
            for fsdp in fsdps:
                specs = sharding.frozen_specs(frozen, fsdp)
                per_chip = 0
                for path, leaf in paths.flatten(frozen).items():
                    nbytes = leaf.size * leaf.dtype.itemsize
                    sharded = any(a is not None for a in paths.get(specs, path))
                    per_chip += nbytes // fsdp if sharded else nbytes
                # Full fine-tuning keeps every leaf in its adapter copy: nothing is frozen then.
                frozen_chip = 0 if method_name == "full" else per_chip
                rows.append({
                    "model": name, "params": paths.count(shapes), "method": method_name, "fsdp": fsdp,
                    "trainable": trainable,
                    "frozen_gib_per_chip": frozen_chip / 2**30,
                    "trainable_state_gib": trainable * 4 * 3 / 2**30,  # params + AdamW mu, nu (replicated)
                    "total_gib_per_chip": (frozen_chip + trainable * 12) / 2**30,
                })
    return rows


def compile_step(model_name: str, mesh: tuple[int, int], method_name: str, batch: int, scan: bool,
                 image_size: int, num_classes: int, remat: bool = False) -> dict:
    """XLA's memory analysis and collective counts of one compiled fsdp train step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_peft
    from jax_peft import scan as scan_lib
    from jax_peft.train import optimizer, sharding
    from jax_peft.train import step as step_lib
    from jax_peft.train.config import default_config

    cfg = jax_peft.vit_config(model_name, num_classes=num_classes, image_size=image_size, scan=scan, remat=remat)
    shapes = jax_peft.param_shapes(jax_peft.vit_config(model_name, num_classes=num_classes, image_size=image_size))
    method = jax_peft.get_method(method_name)
    adapter = jax.eval_shape(lambda p: method.init(jax.random.PRNGKey(0), p), shapes)
    trainable, frozen = step_lib.split_params(shapes, adapter)
    if scan:
        frozen = jax.eval_shape(scan_lib.stack_blocks, frozen)
    tx = optimizer.build_optimizer(default_config().optimizer, 1e-3, decay_mask=method.decay_mask(trainable))
    m = sharding.make_mesh(*mesh)
    specs = sharding.frozen_specs(frozen, mesh[1], stacked_prefix=f"Transformer/{scan_lib.STACKED}/" if scan else None)
    NS = jax.sharding.NamedSharding
    repl = NS(m, jax.sharding.PartitionSpec())
    frozen_sh = jax.tree_util.tree_map(lambda s: NS(m, s), specs,
                                       is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    state = jax.eval_shape(lambda t: step_lib.init_state(t, tx), trainable)
    batch_sh = NS(m, sharding.BATCH)
    fn = step_lib.make_train_fn(jax_peft.ViT(cfg), method, tx, seed=0)
    jitted = jax.jit(fn, in_shardings=(repl, frozen_sh, batch_sh), out_shardings=(repl, repl), donate_argnums=(0,))
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = jitted.lower(state, frozen, {"image": images, "label": labels}).compile()
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    collectives = {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo))
                   for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")}
    frozen_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(frozen))
    return {
        "model": model_name, "method": method_name, "mesh": {"data": mesh[0], "fsdp": mesh[1]}, "batch": batch,
        "scan": scan, "remat": remat, "frozen_bytes_total": frozen_bytes,
        "argument_bytes_per_device": mem.argument_size_in_bytes,
        "output_bytes_per_device": mem.output_size_in_bytes,
        "temp_bytes_per_device": mem.temp_size_in_bytes,
        "collectives": collectives,
    }


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    if args.compile:
        mesh = tuple(int(x) for x in args.mesh.split(","))
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:  # must be set before JAX starts
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={mesh[0] * mesh[1]}"
        out = compile_step(args.compile, mesh, args.method, args.batch, args.scan, args.image_size,
                           args.num_classes, args.remat)
        print(json.dumps(out, indent=1))
    else:
        out = arithmetic(args.models.split(","), args.methods.split(","),
                         [int(x) for x in args.fsdp.split(",")], args.num_classes, args.image_size)
        print(f"{'model':10} {'params':>14} {'method':8} {'fsdp':>4} {'trainable':>11} {'frozen GiB/chip':>16} "
              f"{'total GiB/chip':>15}")
        for r in out:
            if "unsupported" in r:
                print(f"{r['model']:10} {'':>14} {r['method']:8}    -  not applicable: {r['unsupported']}")
                continue
            print(f"{r['model']:10} {r['params']:>14,} {r['method']:8} {r['fsdp']:>4} {r['trainable']:>11,} "
                  f"{r['frozen_gib_per_chip']:>16.2f} {r['total_gib_per_chip']:>15.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
