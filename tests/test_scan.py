"""jax_peft.scan: exact conversion between per-block and stacked parameter layouts."""

import jax
import numpy as np
import pytest
from conftest import random_params, tiny_vit_config

from jax_peft import paths
from jax_peft.scan import stack_blocks, unstack_blocks


def test_stack_unstack_roundtrip_is_exact():
    cfg = tiny_vit_config(num_layers=3)
    params = random_params(cfg, seed=1)
    stacked = stack_blocks(params)
    tr = stacked["Transformer"]
    assert "encoderblock" in tr and not any(k.startswith("encoderblock_") for k in tr)
    q = tr["encoderblock"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    assert q.shape == (3,) + params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape
    np.testing.assert_array_equal(q[2], params["Transformer"]["encoderblock_2"]["MultiHeadDotProductAttention_0"]["query"]["kernel"])
    back = unstack_blocks(stacked)
    a, b = paths.flatten(params), paths.flatten(back)
    assert set(a) == set(b)
    for k in a:
        assert np.asarray(b[k]).dtype == np.asarray(a[k]).dtype, k
        np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
    assert paths.count(stacked) == paths.count(params)


def test_stack_errors_are_clear():
    cfg = tiny_vit_config(num_layers=2)
    params = random_params(cfg)
    with pytest.raises(ValueError, match="already stacked"):
        stack_blocks(stack_blocks(params))
    with pytest.raises(ValueError, match="not a stacked tree"):
        unstack_blocks(params)
    broken = jax.tree_util.tree_map(lambda x: x, params)
    del broken["Transformer"]["encoderblock_0"]
    with pytest.raises(ValueError, match="without gaps"):
        stack_blocks(broken)
    odd = jax.tree_util.tree_map(lambda x: x, params)
    odd["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"] = np.ones(7, np.float32)
    with pytest.raises(ValueError, match="leaf shapes"):
        stack_blocks(odd)


def _scanned_pair(num_layers=3, **overrides):
    import jax_peft

    cfg = tiny_vit_config(num_layers=num_layers, **overrides)
    params = random_params(cfg, seed=2)
    return jax_peft.ViT(cfg), jax_peft.ViT(cfg.replace(scan=True)), params, stack_blocks(params)


def test_scanned_encoder_equals_the_unrolled_one():
    """config.scan=True: one nn.scan body over the stacked layout; same logits and gradients."""
    import jax.numpy as jnp

    import jax_peft

    model, scanned, params, stacked = _scanned_pair()
    init = jax_peft.init_params(scanned.config, 0)
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(stacked)
    inferred = jax_peft.vit_config(stacked)
    assert inferred.scan and inferred.num_layers == 3
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    np.testing.assert_allclose(jax.jit(scanned.apply)({"params": stacked}, x), model.apply({"params": params}, x),
                               rtol=1e-5, atol=1e-5)

    def loss(m):
        return lambda p: jnp.sum(m.apply({"params": p}, x) ** 2)

    g_scan, g_loop = jax.jit(jax.grad(loss(scanned)))(stacked), jax.jit(jax.grad(loss(model)))(params)
    ref = jax.tree_util.tree_leaves(stack_blocks(g_loop))
    scale = max(float(np.abs(b).max()) for b in ref)  # leaves near zero are round-off in both
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_scan), ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale, err_msg=str(path))


@pytest.mark.parametrize("name, hp", [("fact_tt", dict(rank=3, scale=2.0)), ("rlrr", {}),
                                      ("lora", dict(rank=3, variant="fused_qkv")), ("ssf", {})])
def test_method_forward_on_a_scanned_model(name, hp):
    """methods.activation.forward accepts a scanned model with stacked or canonical params, in both
    execution forms; train mode (dropout, drop path per block) is keyed and deterministic."""
    from jax_peft.methods.activation import forward
    from jax_peft.methods.base import get_method

    model, scanned, params, stacked = _scanned_pair(drop_path_rate=0.1)
    method = get_method(name, **hp)
    adapter = method.init(jax.random.PRNGKey(0), params)
    adapter = jax.tree_util.tree_map(lambda a: a + 0.1, adapter)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    # jitted (one compile per model, params layout and mode) instead of op-by-op: 2-3x less test time
    forward = jax.jit(forward, static_argnames=("train",), static_argnums=(0, 1))
    ref = forward(model, method, params, adapter, x)
    for p in (stacked, params):
        np.testing.assert_allclose(forward(scanned, method, p, adapter, x), ref, rtol=1e-5, atol=1e-5)
    key = jax.random.PRNGKey(5)
    t1, t2 = (forward(scanned, method, stacked, adapter, x, train=True, rng=key) for _ in range(2))
    np.testing.assert_array_equal(t1, t2)
    assert not np.allclose(t1, forward(scanned, method, stacked, adapter, x, train=True,
                                       rng=jax.random.PRNGKey(6)), atol=1e-6)


def test_scanned_side_paths_need_every_block():
    from jax_peft.methods.activation import activation_form
    from jax_peft.methods.base import get_method

    _, scanned, params, stacked = _scanned_pair()
    method = get_method("fact_tt", rank=3)
    _, side = activation_form(method, params, method.init(jax.random.PRNGKey(0), params))
    del side[1]
    x = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="every block"):
        scanned.apply({"params": stacked}, x, side=side)
