"""Training behaviours pinned through the trainer's own entry points (`loop.setup`, the runner of
`jax_peft.train.step`): the weight-decay mask of the real set-up, fresh dropout keys every step, and
the masked mean of a padded batch whose real rows are split unevenly across devices (pmap, jit on n
devices, one device; the n-device runs live in a subprocess started with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`, as in test_train_parallel.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from conftest import random_params, tiny_vit_config, xla_flags_with_cpu_devices

import jax_peft
from jax_peft import paths
from jax_peft.train import optimizer
from jax_peft.train import step as step_lib
from jax_peft.train.config import default_config, method_config

TESTS = Path(__file__).resolve().parent


# --- 5. the weight-decay mask reaches the optimizer of loop.setup ---------------------------------

def _no_decay(name: str, path: str) -> bool:
    """The official recipes, from the leaf path alone: BitFit trains biases only (no decay; the head
    kernel decays); RLRR: no decay on names with `bias` or `norm` (shifts f, LN-SSF after LayerNorm_0/1
    and the final encoder_norm, head bias); its s_in, s_out and patch SSF decay."""
    if path == "head/bias":
        return True
    if path == "head/kernel":
        return False
    if name == "bitfit":
        return True
    leaf = path.rsplit("/", 1)[-1]
    return leaf == "f" or ("ssf_" in leaf and ("LayerNorm" in path or "encoder_norm" in path))


@pytest.mark.parametrize("name", ["bitfit", "rlrr"])
def test_weight_decay_mask_reaches_the_optimizer_of_the_training_setup(name):
    """With zero gradients, AdamW moves a decayed leaf by -lr·wd·p and leaves a no-decay leaf alone,
    in the optimizer that `loop.setup` (the CLI's set-up) builds."""
    from test_train_loop import smoke_config  # the CLI's smoke set-up: tiny model, generated data

    from jax_peft.train import loop

    lr, wd = 0.5, 0.1
    config = smoke_config(**{"optimizer.lr": lr, "optimizer.weight_decay": wd, "schedule.warmup_steps": 0})
    config.method = method_config(name)
    s = loop.setup(config)
    assert float(s.schedule(0)) == pytest.approx(lr)
    rng = np.random.default_rng(0)
    trainable = jax.tree_util.tree_map(lambda x: rng.uniform(0.5, 1.5, np.shape(x)).astype(np.float32), s.trainable)
    zero = jax.tree_util.tree_map(np.zeros_like, trainable)
    updates, _ = jax.jit(s.tx.update)(zero, s.tx.init(trainable), trainable)
    moved = paths.flatten(optax.apply_updates(trainable, updates))
    kinds = set()
    for path, p in paths.flatten(trainable).items():
        if _no_decay(name, path.removeprefix("adapter/")):
            np.testing.assert_array_equal(moved[path], p, err_msg=f"{path} (no decay) moved")
        else:
            np.testing.assert_allclose(moved[path] - p, -lr * wd * p, rtol=1e-4, err_msg=path)
        kinds.add(_no_decay(name, path.removeprefix("adapter/")))
    assert kinds == {True, False}
    if name == "rlrr":  # every kind of leaf of the recipe is present
        leaves = {p.rsplit("/", 1)[-1] for p in paths.flatten(trainable)}
        assert {"f", "s_in", "s_out", "ssf_scale", "ssf_shift"} <= leaves


# --- 6. dropout keys change every step ------------------------------------------------------------

def _batch(n=8, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, classes, (n,)).astype(np.int32)}


@pytest.mark.parametrize("name", ["fact_tt", "efft"])  # activation dropout / factor dropout
def test_dropout_keys_change_every_step(name):
    """lr = 0 and dropout on: consecutive steps on the same batch see other masks (other losses)
    while the parameters stay put; a second run from the same state repeats the same losses."""
    cfg = tiny_vit_config(num_layers=1)
    params = random_params(cfg, 1)
    method = jax_peft.get_method(name, rank=2, dropout=0.5)
    rng = np.random.default_rng(2)
    adapter = jax.tree_util.tree_map(lambda x: rng.uniform(-1, 1, x.shape).astype(np.float32),
                                     jax.eval_shape(method.init, jax.random.PRNGKey(0), params))
    trainable, frozen = step_lib.split_params(params, adapter)
    tx = optimizer.build_optimizer(default_config().optimizer, 0.0)
    runner = step_lib.make_runner(jax_peft.ViT(cfg), method, tx, seed=0)
    frozen = runner.put_frozen(frozen)
    batch = runner.put_batch(_batch())

    def run(steps):
        state = runner.put_state(step_lib.init_state(trainable, tx))
        losses = []
        for _ in range(steps):
            state, m = runner.train(state, frozen, batch)
            losses.append(float(runner.get(m)["loss"]))
        return losses, jax.device_get(runner.get_state(state)["trainable"])

    losses, after = run(3)
    assert len(set(losses)) == 3, losses
    jax.tree_util.tree_map(np.testing.assert_array_equal, after, trainable)  # lr = 0: nothing moved
    assert run(3)[0] == losses


# --- 7. the masked mean of a padded batch across devices ------------------------------------------

def padded_batch_results(parallel: str, num_devices: int, padded: bool = True) -> dict:
    """Loss and gradient (plain SGD, lr 1: the step's update is -grad) of one linear-probe step on
    the 5 real rows of an 8-row batch, padded (mask) or as the short batch itself."""
    cfg = tiny_vit_config(num_layers=1)
    params = random_params(cfg, 4)
    params["head"] = {"kernel": 0.3 * np.random.default_rng(5).standard_normal((32, 5)).astype(np.float32),
                      "bias": np.zeros(5, np.float32)}
    method = jax_peft.get_method("linear")
    trainable, frozen = step_lib.split_params(params, {})  # a linear probe's adapter is empty
    oc = default_config().optimizer
    oc.name, oc.momentum, oc.weight_decay = "sgd", 0.0, 0.0
    tx = optimizer.build_optimizer(oc, 1.0)
    runner = step_lib.make_runner(jax_peft.ViT(cfg), method, tx, seed=0, parallel=parallel,
                                  devices=jax.devices()[:num_devices])
    batch = _batch(8, seed=6)  # rows 5-7 are padding: real-looking values that must not count
    if padded:
        batch["mask"] = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
    else:
        batch = {k: v[:5] for k, v in batch.items()}
    state, m = runner.train(runner.put_state(step_lib.init_state(trainable, tx)), runner.put_frozen(frozen),
                            runner.put_batch(batch))
    new = jax.device_get(runner.get_state(state)["trainable"]["head"])
    grad = {k: (trainable["head"][k] - new[k]).tolist() for k in new}
    return {"devices": runner.num_devices, "loss": float(runner.get(m)["loss"]), "grad": grad}


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from test_train_behaviours import padded_batch_results as run
print("RESULT" + json.dumps({{"pmap": run("pmap", 4), "jit": run("jit", 4), "one": run("jit", 1)}}))
"""


def test_padded_batch_split_unevenly_over_devices_gives_the_one_device_loss_and_gradient():
    """Real rows per device 2, 2, 1, 0 (batch 8 over 4 devices, 5 real rows): pmap and jit on 4
    devices give the one-device loss and gradient, which are those of the 5-row batch itself."""
    env = dict(os.environ, XLA_FLAGS=xla_flags_with_cpu_devices(4), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(TESTS))], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ref = padded_batch_results("jit", 1, padded=False)  # meanwhile, here: the short batch
        stdout, stderr = child.communicate(timeout=600)
    finally:
        child.kill()
    assert child.returncode == 0, stderr[-3000:]
    res = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])
    assert [res[k]["devices"] for k in ("pmap", "jit", "one")] == [4, 4, 1]
    assert np.abs(ref["grad"]["kernel"]).max() > 1e-3
    for key in ("pmap", "jit", "one"):
        assert res[key]["loss"] == pytest.approx(ref["loss"], rel=1e-6), key
        for leaf in ("kernel", "bias"):
            np.testing.assert_allclose(res[key]["grad"][leaf], ref["grad"][leaf], rtol=1e-5, atol=1e-7,
                                       err_msg=f"{key} {leaf}")
