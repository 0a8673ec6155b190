"""Optimizer freezing, jitted train/eval steps, loss, and the compiled cost of frozen leaves (tiny ViT, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_peft
from jax_peft import paths
from jax_peft.data import preprocess
from jax_peft.train import optimizer
from jax_peft.train import step as step_lib
from jax_peft.train.config import default_config


@pytest.fixture(scope="module")
def one_block():
    """(ViTConfig, params) of a 1-block tiny ViT: cheaper to compile than the shared 2-block one."""
    from conftest import tiny_vit_config

    cfg = tiny_vit_config(num_layers=1)
    return cfg, jax.tree_util.tree_map(np.asarray, jax_peft.init_params(cfg, 0))


def _batch(n=8, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)
    y = (np.arange(n) % classes).astype(np.int32)
    x[..., 0] += 0.5 * y[:, None, None] / classes  # learnable: the label shifts the red channel
    return {"image": x, "label": y}


def _setup(name, params, cfg, *, lr=1e-2, parallel="jit", opt=None, normalization=None, **hp):
    method = jax_peft.get_method(name, **hp)
    trainable, frozen = step_lib.split_params(params, method.init(jax.random.PRNGKey(0), params))
    oc = opt or default_config().optimizer
    tx = optimizer.build_optimizer(oc, lr, decay_mask=method.decay_mask(trainable))
    runner = step_lib.make_runner(jax_peft.ViT(cfg), method, tx, seed=0, parallel=parallel,
                                  normalization=normalization)
    return method, runner, runner.put_state(step_lib.init_state(trainable, tx)), runner.put_frozen(frozen), frozen


def _train(runner, state, frozen, batch, n):
    losses = []
    for _ in range(n):
        state, m = runner.train(state, frozen, runner.put_batch(batch))
        losses.append(float(runner.get(m)["loss"]))
    return state, losses


def test_frozen_leaves_bit_identical_and_only_targets_change(one_block):
    cfg, tiny_params = one_block
    method, runner, state, frozen_dev, frozen = _setup("bitfit", tiny_params, cfg)
    before = jax.tree_util.tree_map(np.copy, frozen)
    state, _ = _train(runner, state, frozen_dev, _batch(), 3)
    # The frozen argument is neither donated nor modified.
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(frozen_dev), before)
    trainable = jax.device_get(runner.get_state(state)["trainable"])
    eff = paths.flatten(jax.device_get(method.apply(step_lib.join_params(before, trainable), trainable["adapter"])))
    base = paths.flatten(tiny_params)
    changed = {p for p in base if not np.array_equal(eff[p], base[p])}
    targets = set(paths.select(base, jax_peft.methods.simple.BITFIT_TARGETS)) | {"head/kernel", "head/bias"}
    assert changed and changed <= targets
    assert "head/kernel" in changed
    assert int(runner.get(state["step"])) == 3


def test_loss_decreases_on_a_learnable_batch(one_block):
    cfg, params = one_block
    _, runner, state, frozen, _ = _setup("rlrr", params, cfg, lr=3e-2)
    _, losses = _train(runner, state, frozen, _batch(), 15)
    assert losses[-1] < 0.5 * losses[0], losses


def test_no_gradient_computed_for_frozen_leaves(one_block):
    """XLA's cost analysis: a linear probe costs about a forward pass (no backward through the frozen
    backbone); bias-only training skips the weight gradients that full fine-tuning computes."""
    flops = {}
    cfg, params = one_block
    for name in ("linear", "bitfit", "full"):
        _, runner, state, frozen, _ = _setup(name, params, cfg)
        compiled = runner.train.lower(state, frozen, runner.put_batch(_batch())).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops[name] = cost["flops"]
    assert flops["linear"] < 0.5 * flops["full"], flops
    assert flops["bitfit"] < 0.8 * flops["full"], flops


def test_gradients_and_optimizer_state_cover_only_the_trainable_tree(tiny_config, tiny_params):
    method = jax_peft.get_method("linear")
    trainable, frozen = step_lib.split_params(tiny_params, method.init(jax.random.PRNGKey(0), tiny_params))
    tx = optimizer.build_optimizer(default_config().optimizer, 1e-3, decay_mask=method.decay_mask(trainable))
    state = step_lib.init_state(trainable, tx)
    state_size = sum(np.size(x) for x in jax.tree_util.tree_leaves(state["opt_state"]))
    assert state_size == 2 * paths.count(trainable) + 1  # mu, nu, count
    model = jax_peft.ViT(tiny_config)
    fn = step_lib.make_train_fn(model, method, tx, seed=0)
    batch = _batch()
    out_state, metrics = jax.jit(fn)(state, frozen, batch)
    assert jax.tree_util.tree_structure(out_state) == jax.tree_util.tree_structure(state)
    # The step's gradient is the gradient of the loss w.r.t. {adapter, head} alone: its norm equals
    # that of an independent gradient over the head (a linear probe's only trainable leaves).
    def loss(head):
        logits = model.apply({"params": step_lib.join_params(frozen, {"head": head})}, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    want = optax.tree.norm(jax.grad(loss)(trainable["head"]))
    assert float(want) > 0
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(want), rtol=1e-5)


def test_decay_mask_and_sgd_and_clipping():
    tree = {"w": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)}
    zero = jax.tree_util.tree_map(jnp.zeros_like, tree)
    mask = {"w": True, "bias": False}
    oc = default_config().optimizer
    oc.weight_decay = 0.1
    tx = optimizer.build_optimizer(oc, 0.5, decay_mask=mask)
    upd, _ = tx.update(zero, tx.init(tree), tree)
    np.testing.assert_allclose(upd["w"], -0.5 * 0.1 * 2.0)  # decoupled: lr * wd * p
    np.testing.assert_array_equal(upd["bias"], 0.0)
    oc.name, oc.momentum, oc.grad_clip_norm = "sgd", 0.9, 1.0
    tx = optimizer.build_optimizer(oc, 0.5, decay_mask=mask)
    g = {"w": jnp.full((3,), 10.0), "bias": jnp.zeros((3,))}
    upd, _ = tx.update(g, tx.init(tree), tree)
    clipped = 10.0 / np.sqrt(300.0)
    np.testing.assert_allclose(upd["w"], -0.5 * (clipped + 0.1 * 2.0), rtol=1e-6)
    oc.name = "adam"
    with pytest.raises(ValueError, match="adamw"):
        optimizer.build_optimizer(oc, 0.1)


def test_label_smoothing_matches_pytorch_formula():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = jnp.array([0, 2])
    a = 0.1
    logp = jax.nn.log_softmax(logits)
    target = (1 - a) * jax.nn.one_hot(labels, 3) + a / 3
    want = -(target * logp).sum(-1)
    np.testing.assert_allclose(step_lib.cross_entropy(logits, labels, a), want, rtol=1e-6)
    np.testing.assert_allclose(step_lib.cross_entropy(logits, labels), -logp[jnp.arange(2), labels], rtol=1e-6)


def test_pmap_matches_jit_and_eval_counts_masked_rows(one_block):
    cfg, params = one_block
    batch = _batch()
    _, r_jit, s_jit, f_jit, _ = _setup("bitfit", params, cfg)
    _, r_pmap, s_pmap, f_pmap, _ = _setup("bitfit", params, cfg, parallel="pmap")
    s_jit, l_jit = _train(r_jit, s_jit, f_jit, batch, 3)
    s_pmap, l_pmap = _train(r_pmap, s_pmap, f_pmap, batch, 3)
    np.testing.assert_allclose(l_pmap, l_jit, rtol=1e-6)
    ev = dict(batch, mask=np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32))
    out = r_jit.get(r_jit.eval(r_jit.merge(s_jit, f_jit), r_jit.put_batch(ev)))
    assert float(out["count"]) == 5.0 and 0 <= float(out["correct"]) <= 5
    out_p = r_pmap.get(r_pmap.eval(r_pmap.merge(s_pmap, f_pmap), r_pmap.put_batch(ev)))
    assert float(out_p["count"]) == 5.0


def test_bfloat16_compute_keeps_float32_state(one_block):
    cfg, params = one_block
    _, runner, state, frozen, _ = _setup("bitfit", params, cfg.replace(dtype="bfloat16"))
    state, losses = _train(runner, state, frozen, _batch(), 2)
    assert np.isfinite(losses).all()
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(state["trainable"])}
    assert dtypes == {jnp.dtype(jnp.float32)}


def test_batch_not_divisible_by_devices_is_explained(tiny_config, tiny_params):
    _, runner, *_ = _setup("linear", tiny_params, tiny_config)
    runner.num_devices = 8  # as on an 8-device host
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        runner.check_batch_size(12)


def test_activation_form_training_matches_weight_form_without_dropout(one_block):
    """FacT trains in activation form by default (official dropout placement, no full-size weight
    gradient); with dropout off its losses equal the weight form's."""
    cfg, params = one_block
    method = jax_peft.get_method("fact_tt", rank=4, scale=1.0, dropout=0.0)
    assert step_lib.use_activation_form(method) and not step_lib.use_activation_form(method, "weight")
    with pytest.raises(ValueError, match="no activation form"):
        step_lib.use_activation_form(jax_peft.get_method("linear"), "activation")
    adapter = method.init(jax.random.PRNGKey(0), params)
    adapter = jax.tree_util.tree_map(lambda x: x + 0.05, adapter)  # non-zero increments
    trainable, frozen = step_lib.split_params(params, adapter)
    tx = optimizer.build_optimizer(default_config().optimizer, 1e-2)
    losses = {}
    for form in ("weight", "activation"):
        runner = step_lib.make_runner(jax_peft.ViT(cfg), method, tx, seed=0, train_form=form)
        state = runner.put_state(step_lib.init_state(trainable, tx))
        _, losses[form] = _train(runner, state, runner.put_frozen(frozen), _batch(), 2)
    np.testing.assert_allclose(losses["activation"], losses["weight"], rtol=1e-5)


def test_padded_last_batch_equals_the_short_batch(one_block):
    """data.drop_remainder=False: a batch padded with mask 0 trains exactly like the short batch."""
    cfg, tiny_params = one_block
    short = _batch(n=3, seed=3)
    padded = {"image": np.concatenate([short["image"], np.zeros((5, 32, 32, 3), np.float32)]),
              "label": np.concatenate([short["label"], np.zeros((5,), np.int32)]),
              "mask": np.asarray([1, 1, 1, 0, 0, 0, 0, 0], np.float32)}
    _, runner_a, state_a, frozen_a, _ = _setup("lora", tiny_params, cfg, rank=2, dropout=0.0)
    _, runner_b, state_b, frozen_b, _ = _setup("lora", tiny_params, cfg, rank=2, dropout=0.0)
    state_a, loss_a = _train(runner_a, state_a, frozen_a, short, 2)
    state_b, loss_b = _train(runner_b, state_b, frozen_b, padded, 2)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    a = jax.device_get(runner_a.get_state(state_a)["trainable"])
    b = jax.device_get(runner_b.get_state(state_b)["trainable"])
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)


def test_uint8_batches_normalized_on_the_device_are_bit_identical_to_host_normalization(one_block):
    """The training loop sends uint8 images; the steps normalize them with the recipe's normalization
    (a lookup of numpy's values, since XLA's float division does not round like numpy's), so the
    losses and the trained state equal those of host-normalized float32 batches bitwise, padded
    (masked) slots included: zeros of either dtype. (The eval step: test_train_loop's
    test_eval_merges_the_adapter_once_per_pass, uint8 batches against a host-normalized forward.)"""
    every = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    on_device = jax.jit(preprocess.normalize_on_device, static_argnums=1)
    for kind in preprocess.NORMALIZATIONS:
        np.testing.assert_array_equal(on_device(every, kind), preprocess.normalize(every, kind))
    cfg, params = one_block
    raw = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    raw[6:] = 0  # padded slots, as the pipeline fills them
    mask = np.asarray([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    uint8 = {"image": raw, "label": (np.arange(8) % 5).astype(np.int32), "mask": mask}
    host = dict(uint8, image=preprocess.normalize(raw, "imagenet"))
    host["image"][6:] = 0.0
    _, runner, state, frozen, _ = _setup("linear", params, cfg, normalization="imagenet")
    state_host = runner.put_state(jax.device_get(runner.get_state(state)))
    state, loss_u = _train(runner, state, frozen, uint8, 2)
    state_host, loss_f = _train(runner, state_host, frozen, host, 2)
    assert loss_u == loss_f, (loss_u, loss_f)
    jax.tree_util.tree_map(np.testing.assert_array_equal, *jax.device_get((state, state_host)))
    _, plain, plain_state, *_ = _setup("linear", params, cfg)  # built without a normalization
    with pytest.raises(ValueError, match="uint8 images but the step was built without"):
        plain.train(plain_state, frozen, plain.put_batch(uint8))
