"""Mixed precision: bfloat16 compute (ViTConfig.dtype) with float32 parameters, optimizer state and
merge tracks float32 training on a tiny task, through the training step of jax_peft.train.step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_params, tiny_vit_config

import jax_peft
from jax_peft.methods.base import get_method
from jax_peft.train import step as step_lib

STEPS = 25


def _task():
    cfg = tiny_vit_config(num_layers=1, image_size=16, num_classes=4)
    params = random_params(cfg, seed=3)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32)
    labels = (np.arange(16) % 4).astype(np.int32)
    return cfg, params, {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


def _train(cfg, params, batch, method, dtype):
    model = jax_peft.ViT(cfg.replace(dtype=dtype))
    adapter = method.init(jax.random.PRNGKey(1), params)
    trainable, frozen = step_lib.split_params(jax.tree_util.tree_map(jnp.asarray, params), adapter)
    tx = optax.adamw(1e-2, weight_decay=1e-4)
    state = step_lib.init_state(trainable, tx)
    train = jax.jit(step_lib.make_train_fn(model, method, tx, seed=0))
    losses = []
    for _ in range(STEPS):
        state, metrics = train(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


# LoRA trains in activation form with dropout; RLRR (weight form) is `pytest -m extended`.
@pytest.mark.parametrize("name,hp", [("lora", dict(rank=4, dropout=0.1)),
                                     pytest.param("rlrr", {}, marks=pytest.mark.extended)])
def test_bf16_compute_tracks_fp32(name, hp):
    cfg, params, batch = _task()
    method = get_method(name, **hp)

    # bf16 really computes in bf16 (the comparison below could not fail otherwise)
    p = jax.tree_util.tree_map(jnp.asarray, params)
    l32 = jax_peft.ViT(cfg).apply({"params": p}, batch["image"])
    l16 = jax_peft.ViT(cfg.replace(dtype="bfloat16")).apply({"params": p}, batch["image"])
    assert l16.dtype == jnp.float32  # logits are returned in float32
    diff = float(jnp.abs(l16 - l32).max())
    assert 1e-4 < diff < 0.1 * float(jnp.abs(l32).max()), diff

    loss32, s32 = _train(cfg, params, batch, method, "float32")
    loss16, s16 = _train(cfg, params, batch, method, "bfloat16")

    # parameters and optimizer state stay float32 under bf16 compute
    for leaf in jax.tree_util.tree_leaves((s16["trainable"], s16["opt_state"])):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32, leaf.dtype
    # both learn, and bf16 follows the fp32 loss curve
    assert loss32[-1] < 0.5 * loss32[0] and loss16[-1] < 0.5 * loss16[0], (loss32, loss16)
    np.testing.assert_allclose(loss16, loss32, atol=0.02 * loss32[0] + 0.01)

    # merge in float32: plain float32 tree, predictions agree with the fp32-trained model
    merged16 = jax_peft.merge(step_lib.join_params(_frozen(params), s16["trainable"]), method,
                              s16["trainable"]["adapter"])
    merged32 = jax_peft.merge(step_lib.join_params(_frozen(params), s32["trainable"]), method,
                              s32["trainable"]["adapter"])
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(merged16))
    model = jax_peft.ViT(cfg)
    p16 = model.apply({"params": merged16}, batch["image"])
    p32 = model.apply({"params": merged32}, batch["image"])
    agree = float(jnp.mean(jnp.argmax(p16, -1) == jnp.argmax(p32, -1)))
    assert agree >= 0.9, agree


def _frozen(params):
    return {k: jnp.asarray(v) if not isinstance(v, dict) else jax.tree_util.tree_map(jnp.asarray, v)
            for k, v in params.items() if k != "head"}
