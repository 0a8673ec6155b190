"""Activation-form side paths (vit.SidePath) equal the weight form and train with dropout."""

import jax
import numpy as np

import jax_peft
from jax_peft import paths
from jax_peft.sites import MODULES, matrix_view
from jax_peft.vit import SidePath


def _tiny():
    cfg = jax_peft.vit_config(None, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                              mlp_dim=64, num_classes=5, image_size=16)
    params = jax_peft.init_params(cfg, 0)
    params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(9), params["head"]["kernel"].shape)
    return cfg, params


def _random_side(cfg, key, dropout=0.0, dropout_after=-1):
    dims = {"q": (32, 32), "k": (32, 32), "v": (32, 32), "o": (32, 32), "fc1": (32, 64), "fc2": (64, 32)}
    side = {}
    for i in range(cfg.num_layers):
        side[i] = {}
        for name, (din, dout) in dims.items():
            key, k1, k2, k3 = jax.random.split(key, 4)
            factors = (jax.random.normal(k1, (din, 3)), jax.random.normal(k2, (3, 2)) * 0.3,
                       jax.random.normal(k3, (2, dout)) * 0.1)
            side[i][name] = SidePath(factors, scale=0.7, dropout=dropout, dropout_after=dropout_after)
    return side


def _fold(params, side):
    flat = paths.flatten(params)
    for i, mods in side.items():
        for name, path in mods.items():
            kp = f"Transformer/encoderblock_{i}/{MODULES[name]}/kernel"
            k = flat[kp]
            flat[kp] = (matrix_view(k, name) + path.increment()).reshape(k.shape)
    return paths.unflatten(flat)


def test_side_paths_equal_weight_form_logits_and_grads():
    cfg, params = _tiny()
    side = _random_side(cfg, jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 16, 16, 3))
    model = jax_peft.ViT(cfg)
    # one jitted value-and-grad per form (eager op-by-op dispatch of the backward took 20 s)
    act, g_act = jax.jit(jax.value_and_grad(lambda s: model.apply({"params": params}, x, side=s).sum()))(side)
    weight, g_w = jax.jit(jax.value_and_grad(lambda s: model.apply({"params": _fold(params, s)}, x).sum()))(side)
    np.testing.assert_allclose(act, weight, rtol=1e-5, atol=1e-5)
    logits = model.apply({"params": params}, x, side=side)  # and the eager logits, element by element
    np.testing.assert_allclose(logits, model.apply({"params": _fold(params, side)}, x), rtol=1e-5, atol=1e-5)

    for a, b in zip(jax.tree_util.tree_leaves(g_act), jax.tree_util.tree_leaves(g_w)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_side_path_dropout_only_in_training_and_keyed():
    cfg, params = _tiny()
    side = _random_side(cfg, jax.random.PRNGKey(1), dropout=0.5, dropout_after=1)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))
    model = jax_peft.ViT(cfg)
    ev = model.apply({"params": params}, x, side=side)
    ev_fold = model.apply({"params": _fold(params, side)}, x)
    np.testing.assert_allclose(ev, ev_fold, rtol=1e-5, atol=1e-5)
    tr = lambda k: model.apply({"params": params}, x, train=True, side=side, rngs={"dropout": k})
    a, b, c = tr(jax.random.PRNGKey(0)), tr(jax.random.PRNGKey(0)), tr(jax.random.PRNGKey(5))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, ev)
    assert not np.allclose(a, c)


def test_side_path_placed_at_columns_of_a_fused_output():
    """`SidePath(columns=(offset, width))` adds its d_out-wide term at [offset, offset + d_out) of a
    width-wide output: the Swin's fused qkv takes it part by part (aligned with a part or straddling
    two), and `increment` gives the placed (d_in, width) matrix."""
    from jax_peft.swin import _qkv_with_side

    d, r = 8, 3
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, d)).astype(np.float32)
    y = rng.normal(size=(2, 5, 3 * d)).astype(np.float32)
    for offset, d_out in ((d, d), (d - 3, d + 5), (0, 3 * d)):
        a = rng.normal(size=(d, r)).astype(np.float32)
        b = rng.normal(size=(r, d_out)).astype(np.float32)
        path = SidePath((a, b), scale=0.5, columns=(offset, 3 * d))
        placed = path.increment()
        assert placed.shape == (d, 3 * d)
        np.testing.assert_array_equal(np.delete(np.asarray(placed), np.s_[offset:offset + d_out], axis=1), 0.0)
        parts = _qkv_with_side(None, y, x, {"qkv": path}, deterministic=True)
        np.testing.assert_allclose(np.concatenate(parts, -1), y + x @ np.asarray(placed), rtol=1e-5, atol=1e-5)
    with np.testing.assert_raises_regex(ValueError, "does not fit at offset 20 of width 24"):
        SidePath((a, b[:, :d]), columns=(20, 3 * d)).increment()
