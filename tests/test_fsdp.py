"""Frozen parameters sharded over an fsdp mesh axis: same losses as data parallelism, 1/fsdp the bytes.

The parent pytest process has 1 device; a subprocess sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX initializes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import xla_flags_with_cpu_devices
from jax.sharding import PartitionSpec as P

from jax_peft.train import sharding

TESTS = Path(__file__).resolve().parent


def run(method_name: str, mesh: tuple[int, int], scan: bool = False, steps: int = 2) -> dict:
    """Losses of `steps` steps (tiny ViT, width 64, batch 16) and the frozen bytes per device; all
    frozen leaves are sharded (`shard_min_bytes=0`), whatever their size."""
    import jax
    from conftest import tiny_vit_config, train_on_random_batches

    import jax_peft
    from jax_peft import scan as scan_lib
    from jax_peft.train import optimizer
    from jax_peft.train import step as step_lib
    from jax_peft.train.config import default_config

    size = dict(hidden_size=64, mlp_dim=128, num_heads=4, num_layers=1 if not scan else 2)
    cfg = tiny_vit_config(**size, scan=scan)
    params = jax.tree_util.tree_map(np.asarray, jax_peft.init_params(tiny_vit_config(**size), 0))
    method = jax_peft.get_method(method_name)
    trainable, frozen = step_lib.split_params(params, method.init(jax.random.PRNGKey(0), params))
    tx = optimizer.build_optimizer(default_config().optimizer, 1e-2, decay_mask=method.decay_mask(trainable))
    runner = step_lib.make_runner(jax_peft.ViT(cfg), method, tx, seed=0, mesh=mesh, shard_min_bytes=0,
                                  normalization="imagenet")  # uint8 batches over the (data, fsdp) mesh
    state = runner.put_state(step_lib.init_state(trainable, tx))
    frozen = runner.put_frozen(scan_lib.stack_blocks(frozen) if scan else frozen)
    state, losses, _ = train_on_random_batches(runner, state, frozen, steps)
    per_device = sharding.bytes_per_device(frozen)
    return {"losses": losses, "max_bytes": max(per_device.values()),
            "total_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(frozen))}


def streamed_placement() -> dict:
    """A Google .npz placed on 8 devices from the lazy reader (each device reads its slice from the
    file) against the eager load placed the same way: shardings and every shard's values, per mesh
    (fsdp=8, data=2 x fsdp=4) and layout (per-block, scan-stacked)."""
    import tempfile

    import jax
    from conftest import random_params, tiny_vit_config

    import jax_peft
    from jax_peft import paths
    from jax_peft import scan as scan_lib
    from jax_peft.lazy_npz import LazyArray, to_device

    out = {}
    with tempfile.TemporaryDirectory() as d:
        path = jax_peft.save_checkpoint(f"{d}/vit.npz", random_params(tiny_vit_config(hidden_size=64, mlp_dim=128,
                                                                                     num_heads=4), 0))
        for data, fsdp in ((1, 8), (2, 4)):
            mesh = sharding.make_mesh(data, fsdp)
            for scanned in (False, True):
                trees = [jax_peft.load_checkpoint(path, lazy=lazy) for lazy in (False, True)]
                if scanned:
                    trees = [scan_lib.stack_blocks(t) for t in trees]
                specs = sharding.frozen_specs(trees[0], fsdp, min_bytes=0,
                                              stacked_prefix="Transformer/encoderblock/" if scanned else None)
                eager, streamed = (paths.flatten(sharding.put_sharded(t, mesh, specs)) for t in trees)
                same = all(streamed[k].sharding == v.sharding and all(
                    a.index == b.index and np.array_equal(a.data, b.data)
                    for a, b in zip(v.addressable_shards, streamed[k].addressable_shards)) for k, v in eager.items())
                per_device = sharding.bytes_per_device(streamed)
                out[f"{data}x{fsdp} scan={scanned}"] = {
                    "same": same, "max_bytes": max(per_device.values()),
                    "total_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(streamed))}
            # the callback reads each distinct slice once (data replicas share it), 1/fsdp of the leaf
            reads = []
            full = np.arange(16 * 64, dtype=np.float32).reshape(16, 64)
            leaf = LazyArray(full.shape, np.float32, lambda idx: reads.append(full[idx].size) or full[idx])
            placed = to_device(leaf, jax.sharding.NamedSharding(mesh, P(None, "fsdp")))
            out[f"{data}x{fsdp} reads"] = {"sizes": reads, "same": bool(np.array_equal(np.asarray(placed), full))}
    return out


# CI runs the lora pair (plain data parallel vs fsdp=4 x data=2); `python tests/test_fsdp.py --full`
# runs every row (also fsdp=8, RLRR in weight form and FacT-TT on the scanned encoder), about 3 CPU
# minutes. tests/test_distributed.py runs fsdp=8 across two processes (RLRR) against one process.
QUICK = (("lora", (8, 1), False), ("lora", (2, 4), False))
FULL = QUICK + (("lora", (1, 8), False), ("rlrr", (8, 1), False), ("rlrr", (2, 4), False),
                ("fact_tt", (8, 1), True), ("fact_tt", (2, 4), True))

_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from test_fsdp import run
from test_fsdp import streamed_placement
print("RESULT" + json.dumps({{f"{{m}} {{mesh}} {{scan}}": run(m, tuple(mesh), scan) for m, mesh, scan in {rows!r}}}))
print("STREAMED" + json.dumps(streamed_placement()))
"""


def run_matrix(rows) -> tuple[dict, dict]:
    env = dict(os.environ, XLA_FLAGS=xla_flags_with_cpu_devices(8), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _CHILD.format(tests=str(TESTS), rows=rows)], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    return (json.loads(next(line for line in lines if line.startswith("RESULT"))[6:]),
            json.loads(next(line for line in lines if line.startswith("STREAMED"))[8:]))


def check_matrix(res: dict) -> None:
    """Every fsdp row equals its method's data-parallel row; frozen bytes per device ~ 1/fsdp."""
    for key, got in res.items():
        method, scan = key.split(" ")[0], key.endswith("True")
        ref = res[f"{method} (8, 1) {scan}"]
        assert ref["max_bytes"] == ref["total_bytes"]  # data parallel: replicated
        fsdp = int(key.split(")")[0].split(",")[1])
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=2e-5, err_msg=key)
        assert got["total_bytes"] == ref["total_bytes"]
        # with min_bytes=0 every frozen leaf of the width-64 model has an axis divisible by 8
        assert got["max_bytes"] <= ref["total_bytes"] / fsdp * 1.05, (key, got, ref)


def check_streamed(res: dict) -> None:
    """The streamed placement equals the eager one shard for shard and divides the bytes by fsdp."""
    for key, got in res.items():
        fsdp = int(key.split("x")[1].split(" ")[0])
        assert got["same"], key
        if key.endswith("reads"):
            assert got["sizes"] == [16 * 64 // fsdp] * fsdp, (key, got)
        else:
            assert got["max_bytes"] <= got["total_bytes"] / fsdp * 1.05, (key, got)


def test_fsdp_matches_data_parallel_divides_memory_and_streams_checkpoints():
    rows, streamed = run_matrix(QUICK)
    check_matrix(rows)
    check_streamed(streamed)


def test_leaf_spec_picks_the_largest_divisible_axis():
    assert sharding.leaf_spec((768, 3072), 768 * 3072 * 4, "shard", 8) == P(None, "fsdp")
    assert sharding.leaf_spec((3072, 768), 768 * 3072 * 4, "shard", 8) == P("fsdp")
    assert sharding.leaf_spec((12, 768, 3072), 1 << 30, "shard", 4, stacked=True) == P(None, None, "fsdp")
    # the depth axis of a stacked leaf is never sharded, even when it is the only divisible one
    assert sharding.leaf_spec((8, 3, 5), 1 << 30, "shard", 8, stacked=True) == P()
    assert sharding.leaf_spec((1408, 6144), 1 << 30, "shard", 16) == P(None, "fsdp")  # 1408 % 16 == 0 too
    assert sharding.leaf_spec((7, 9), 1 << 30, "shard", 8) == P()  # nothing divisible: replicated
    assert sharding.leaf_spec((768,), 3072, "shard", 8) == P()  # below min_bytes
    assert sharding.leaf_spec((768, 3072), 1 << 30, "replicate", 8) == P()


def test_rules_must_cover_every_leaf_and_be_valid():
    tree = {"Transformer": {"encoderblock_0": {"kernel": np.zeros((64, 64), np.float32)}},
            "embedding": {"kernel": np.zeros((8, 8, 3, 64), np.float32)}}
    specs = sharding.frozen_specs(tree, 4, [(r"encoderblock", "shard"), (r"embedding", "replicate")], min_bytes=0)
    assert specs["Transformer"]["encoderblock_0"]["kernel"] == P("fsdp")
    assert specs["embedding"]["kernel"] == P()
    with pytest.raises(ValueError, match=r"no sharding rule covers embedding/kernel.*\(r'\.\*', 'replicate'\)"):
        sharding.frozen_specs(tree, 4, [(r"encoderblock", "shard")])
    with pytest.raises(ValueError, match="must be one of"):
        sharding.frozen_specs(tree, 4, [(r".*", "split")])


def test_mesh_shape_errors_name_the_fix():
    assert sharding.mesh_shape(8, -1, 4) == (2, 4)
    assert sharding.mesh_shape(8, 8, 1) == (8, 1)
    with pytest.raises(ValueError, match=r"mesh.fsdp=3 .*--config.mesh.fsdp=2"):
        sharding.mesh_shape(8, -1, 3)
    with pytest.raises(ValueError, match=r"mesh.data=4 x mesh.fsdp=4 .*--config.mesh.data=2"):
        sharding.mesh_shape(8, 4, 4)


if __name__ == "__main__":
    import time

    t0 = time.time()
    results, streamed = run_matrix(FULL if "--full" in sys.argv else QUICK)
    check_matrix(results)
    check_streamed(streamed)
    for k, v in results.items():
        print(f"{k:28} losses {v['losses']}  frozen bytes/device {v['max_bytes']:,} of {v['total_bytes']:,}")
    print(f"all rows agree ({time.time() - t0:.0f} s)")
