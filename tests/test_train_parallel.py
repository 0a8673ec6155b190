"""8 simulated CPU devices give the same losses as 1 device, for the jit (NamedSharding) and pmap steps.

The parent pytest process has 1 device; a subprocess sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX initializes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import xla_flags_with_cpu_devices

TESTS = Path(__file__).resolve().parent


def run_losses(parallel: str, dropout: float = 0.0, steps: int = 3) -> dict:
    """Losses of `steps` bitfit steps (1-block tiny ViT, batch 16) and the final eval counts."""
    import jax
    from conftest import tiny_vit_config, train_on_random_batches

    import jax_peft
    from jax_peft.train import optimizer
    from jax_peft.train import step as step_lib
    from jax_peft.train.config import default_config

    cfg = tiny_vit_config(num_layers=1, dropout_rate=dropout)
    params = jax.tree_util.tree_map(np.asarray, jax_peft.init_params(cfg, 0))
    method = jax_peft.get_method("bitfit")
    trainable, frozen = step_lib.split_params(params, method.init(jax.random.PRNGKey(0), params))
    tx = optimizer.build_optimizer(default_config().optimizer, 1e-2, decay_mask=method.decay_mask(trainable))
    runner = step_lib.make_runner(jax_peft.ViT(cfg), method, tx, seed=0, parallel=parallel,
                                  normalization="minus_one_one")  # uint8 batches, sharded as the loop's
    state, frozen = runner.put_state(step_lib.init_state(trainable, tx)), runner.put_frozen(frozen)
    state, losses, batch = train_on_random_batches(runner, state, frozen, steps)
    ev = runner.get(runner.eval(runner.merge(state, frozen), runner.put_batch(dict(batch, mask=np.ones(16, np.float32)))))
    return {"devices": runner.num_devices, "losses": losses, "correct": float(ev["correct"]),
            "loss_sum": float(ev["loss_sum"])}


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from test_train_parallel import run_losses
print("RESULT" + json.dumps({{"pmap": run_losses("pmap"), "jit_drop": run_losses("jit", dropout=0.1)}}))
"""


def test_eight_devices_match_one_device():
    env = dict(os.environ, XLA_FLAGS=xla_flags_with_cpu_devices(8), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _CHILD.format(tests=str(TESTS))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
    eight = json.loads(line[len("RESULT"):])
    one = {"jit": run_losses("jit"), "jit_drop": run_losses("jit", dropout=0.1)}
    assert one["jit"]["devices"] == 1
    # pmap without dropout; jit with dropout (the masks do not depend on the sharding).
    for key in ("pmap", "jit_drop"):
        assert eight[key]["devices"] == 8
        ref = one["jit_drop" if key == "jit_drop" else "jit"]
        np.testing.assert_allclose(eight[key]["losses"], ref["losses"], rtol=2e-6, atol=0)
        assert eight[key]["correct"] == ref["correct"]
        np.testing.assert_allclose(eight[key]["loss_sum"], ref["loss_sum"], rtol=2e-6)
    # Dropout is really on in jit_drop (its losses differ from the deterministic run).
    assert one["jit_drop"]["losses"][1:] != one["jit"]["losses"][1:]
