"""RLRR parity with the official PyTorch code (tests/data/rlrr_d2.npz), conversion and options."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_params, tiny_vit_config
from formula import formula_input, formula_params

import jax_peft
from jax_peft import paths

GOLDEN = "tests/data/rlrr_d2.npz"


@pytest.fixture(scope="module")
def golden():
    z = np.load(GOLDEN)
    adapter_sd = {k[len("adapter/"):]: z[k] for k in z.files if k.startswith("adapter/")}
    grads = {k[len("grad/"):]: z[k] for k in z.files if k.startswith("grad/")}
    meta = json.loads(str(z["meta"]))
    return dict(adapter=adapter_sd, grads=grads, logits=z["logits"], loss=float(z["loss"]), meta=meta)


@pytest.fixture(scope="module")
def setup(golden):
    params = formula_params(golden["meta"]["depth"])
    cfg = jax_peft.vit_config(params, gelu="exact")
    model = jax_peft.ViT(cfg)
    method = jax_peft.get_method("rlrr")
    adapter = jax_peft.from_official("rlrr", golden["adapter"], params=params)
    return params, model, method, adapter


def _loss_fn(model, method, params):
    x, labels = formula_input()

    def loss(adapter, head):
        eff = method.apply({**params, "head": head}, adapter)
        logits = model.apply({"params": eff}, jnp.asarray(x), train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean(), logits

    return loss


def _rel(ours, gold):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - gold)) / max(np.max(np.abs(gold)), 1e-4))


def test_logits_loss_and_gradients_match_official(golden, setup):
    params, model, method, adapter = setup
    loss_fn = _loss_fn(model, method, params)
    (loss, logits), (g_ad, g_head) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
        adapter, params["head"])
    assert _rel(logits, golden["logits"]) < 1e-4
    assert abs(float(loss) - golden["loss"]) / abs(golden["loss"]) < 1e-4
    ours = method.to_official({"adapter": g_ad, "head": g_head})
    assert set(ours) == set(golden["grads"])
    worst = {k: _rel(ours[k], g) for k, g in golden["grads"].items()}
    bad = {k: v for k, v in worst.items() if v > 1e-3}
    assert not bad, bad
    for k, g in golden["grads"].items():
        assert ours[k].shape == g.shape, k


def test_round_trip_and_merge(golden, setup):
    params, model, method, adapter = setup
    back = jax_peft.to_official("rlrr", adapter)
    assert set(back) == set(golden["adapter"])
    for k, v in golden["adapter"].items():
        np.testing.assert_allclose(back[k], v, rtol=1e-6, atol=1e-7)
        assert back[k].shape == v.shape
    merged = jax_peft.merge(params, method, adapter)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    x, _ = formula_input()
    logits = model.apply({"params": merged}, jnp.asarray(x), train=False)
    assert _rel(logits, golden["logits"]) < 1e-4


def test_from_official_reports_every_problem(golden, setup):
    params = setup[0]
    sd = dict(golden["adapter"])
    sd.pop("transformer.encoder.layer.1.attn.key.scale_col")
    sd["transformer.encoder.layer.0.ffn.fc2.scale_line"] = np.zeros((3072, 1))
    sd["transformer.encoder.layer.0.attn.qkv.scale_col"] = np.zeros((1, 768))
    sd["transformer.encoder.layer.0.attn.query.weight"] = np.zeros((768, 768))  # backbone: ignored
    with pytest.raises(ValueError) as e:
        jax_peft.from_official("rlrr", sd, params=params)
    msg = str(e.value)
    assert "missing transformer.encoder.layer.1.attn.key.scale_col" in msg
    assert "layer.0.ffn.fc2.scale_line has shape (3072, 1), expected (768, 1)" in msg
    assert "unexpected transformer.encoder.layer.0.attn.qkv.scale_col" in msg
    assert "query.weight" not in msg


def test_from_official_without_params_infers_depth(golden, setup):
    adapter = jax_peft.from_official("rlrr", golden["adapter"])
    assert paths.count(adapter) == paths.count(setup[3])


def test_init_distributions_and_count():
    params = random_params(tiny_vit_config(hidden_size=64, mlp_dim=128), 0)
    method = jax_peft.get_method("rlrr")
    ad = method.init(jax.random.PRNGKey(0), params)
    d, m, depth = 64, 128, 2
    assert method.num_params(ad) == depth * (19 * d + 3 * m) + 4 * d
    q = ad["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]
    fc2 = ad["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_1"]
    assert np.max(np.abs(q["s_in"])) <= np.sqrt(6 / d) and np.max(np.abs(q["s_in"])) > 0.5 * np.sqrt(6 / d)
    assert np.max(np.abs(fc2["s_in"])) <= np.sqrt(6 / m)
    assert np.max(np.abs(q["s_out"])) <= np.sqrt(6) and np.max(np.abs(q["s_out"])) > 1.0
    assert np.all(q["f"] == 0)
    ln = ad["Transformer"]["encoderblock_1"]["LayerNorm_1"]
    assert abs(float(np.mean(ln["ssf_scale"])) - 1) < 0.01 and 0.01 < float(np.std(ln["ssf_scale"])) < 0.03
    assert 0.01 < float(np.std(ln["ssf_shift"])) < 0.03
    assert method.head_init == "zeros"


def test_identity_init_is_the_pretrained_model():
    params = random_params(tiny_vit_config(), 1)
    method = jax_peft.get_method("rlrr", init="identity")
    eff = method.apply(params, method.init(jax.random.PRNGKey(0), params))
    for a, b in zip(jax.tree_util.tree_leaves(eff), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_selection_options_and_decay_mask():
    params = random_params(tiny_vit_config(num_layers=3), 0)
    key = jax.random.PRNGKey(0)
    d, m = 32, 64
    ffn = jax_peft.get_method("rlrr", modules=("fc1", "fc2"), ln_ssf=False, patch_ssf=False, final_ssf=False)
    assert ffn.num_params(ffn.init(key, params)) == 3 * (d + 2 * m + m + 2 * d)
    ln_only = jax_peft.get_method("rlrr", targets="LayerNorm")
    assert ln_only.num_params(ln_only.init(key, params)) == 3 * 4 * d
    late = jax_peft.get_method("rlrr", layers=range(1, 3))
    ad = late.init(key, params)
    assert "encoderblock_0" not in ad["Transformer"]
    assert late.num_params(ad) == 2 * (19 * d + 3 * m) + 4 * d
    with pytest.raises(ValueError, match="selects no"):
        jax_peft.get_method("rlrr", targets="nothing_here").init(key, params)
    with pytest.raises(ValueError, match="do not exist"):
        jax_peft.get_method("rlrr", layers=[5]).init(key, params)
    with pytest.raises(ValueError, match="unknown module"):
        jax_peft.get_method("rlrr", modules=("qkv",))
    with pytest.raises(ValueError, match="unknown init"):
        jax_peft.get_method("rlrr", init="zeros")

    method = jax_peft.get_method("rlrr")
    ad = method.init(key, params)
    mask = paths.flatten(method.decay_mask({"adapter": ad, "head": params["head"]}))
    off = sorted(p for p, v in mask.items() if not v)
    on = sorted(p for p, v in mask.items() if v)
    assert "head/bias" in off and "head/kernel" in on
    assert "adapter/embedding/ssf_scale" in on and "adapter/embedding/ssf_shift" in on
    assert "adapter/Transformer/encoder_norm/ssf_scale" in off
    assert "adapter/Transformer/encoderblock_2/LayerNorm_1/ssf_shift" in off
    assert "adapter/Transformer/encoderblock_0/MlpBlock_0/Dense_0/f" in off
    assert "adapter/Transformer/encoderblock_0/MlpBlock_0/Dense_0/s_in" in on
    assert "adapter/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/s_out" in on
