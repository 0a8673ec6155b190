"""Activation form (methods/activation.py) == weight form (method.apply) for the low-rank methods."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_peft
from jax_peft.methods.activation import activation_form, supports_activation_form
from jax_peft.methods.base import get_method, method_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, hparams) of every supported variant; methods whose module has not landed are skipped.
VARIANTS = [
    ("fact_tt", dict(rank=3, scale=2.0)),
    ("fact_tt", dict(rank=3, scale=0.5, blocks="ffn")),
    ("fact_tk", dict(rank=3, scale=2.0)),
    ("fact_tk", dict(rank=3, scale=1.5, mlp_layout="paper")),
    ("fact_tk", dict(rank=3, scale=1.0, blocks="mhsa")),
    ("efft", dict(rank=3, scale=2.0)),
    ("lora", dict(rank=3, alpha=6.0, targets=("q", "v", "o", "fc1", "fc2"))),
    ("lora", dict(rank=3, variant="fused_qkv")),
]
SSF_VARIANTS = [("ssf", {}), ("ssf", dict(sites=("qkv", "fc2"), patch_ssf=False, final_ssf=False))]


def _method(name, **hp):
    try:
        method_class(name)
    except ImportError:
        pytest.skip(f"method module for {name} not available yet")
    try:
        return get_method(name, **hp)
    except TypeError as e:  # an option spelled differently in the method module
        pytest.skip(f"{name}: {e}")


def _tiny():
    cfg = jax_peft.vit_config(None, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                              mlp_dim=128, num_classes=5, image_size=16)
    params = jax_peft.init_params(cfg, 0)
    params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(9), params["head"]["kernel"].shape)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 16, 16, 3))
    return cfg, params, x


def _adapter(method, params, seed=1):
    """A non-trivial adapter: every leaf random (the official inits zero one factor)."""
    adapter = method.init(jax.random.PRNGKey(seed), params)
    leaves, treedef = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    leaves = [0.3 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _ids(v):
    return f"{v[0]}-" + "-".join(f"{k}={x}" for k, x in v[1].items())


@pytest.mark.parametrize("variant", VARIANTS + SSF_VARIANTS, ids=[_ids(v) for v in VARIANTS + SSF_VARIANTS])
def test_eval_logits_and_grads_equal_weight_form(variant):
    name, hp = variant
    cfg, params, x = _tiny()
    model = jax_peft.ViT(cfg)
    method = _method(name, **(hp if name == "ssf" else {**hp, "dropout": 0.0}))  # SSF has no dropout
    adapter = _adapter(method, params)

    weight = model.apply({"params": method.apply(params, adapter)}, x)
    p2, side = activation_form(method, params, adapter)
    act = model.apply({"params": p2}, x, side=side)
    assert np.abs(np.asarray(weight) - np.asarray(model.apply({"params": params}, x))).max() > 1e-2
    np.testing.assert_allclose(act, weight, rtol=1e-5, atol=1e-5)

    labels = jnp.arange(3) % 5

    def loss(a, form):
        if form == "weight":
            logits = model.apply({"params": method.apply(params, a)}, x, train=True,
                                 rngs={"dropout": jax.random.PRNGKey(0)})
        else:
            p, s = activation_form(method, params, a)
            logits = model.apply({"params": p}, x, train=True, side=s, rngs={"dropout": jax.random.PRNGKey(0)})
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels])

    g_w = jax.grad(loss)(adapter, "weight")
    g_a = jax.grad(loss)(adapter, "activation")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_a), jax.tree_util.tree_leaves(g_w)):
        scale = np.abs(np.asarray(b)).max()
        assert scale > 0, path
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=str(path))


@pytest.mark.parametrize("variant", VARIANTS[::2] + VARIANTS[-1:], ids=[_ids(v) for v in VARIANTS[::2] + VARIANTS[-1:]])
def test_training_dropout_is_keyed_and_deterministic(variant):
    name, hp = variant
    cfg, params, x = _tiny()
    model = jax_peft.ViT(cfg)
    method = _method(name, **{**hp, "dropout": 0.3})
    adapter = _adapter(method, params)
    p_ev, side_ev = activation_form(method, params, adapter)
    ev = model.apply({"params": p_ev}, x, side=side_ev)

    def train(key):
        k_model, k_method = jax.random.split(key)
        p, s = activation_form(method, params, adapter, rng=k_method)
        return model.apply({"params": p}, x, train=True, side=s, rngs={"dropout": k_model})

    a, b, c = train(jax.random.PRNGKey(0)), train(jax.random.PRNGKey(0)), train(jax.random.PRNGKey(7))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, ev, atol=1e-4)
    assert not np.allclose(a, c, atol=1e-4)
    # eval mode ignores the dropout rate: still equal to the weight form
    weight = model.apply({"params": method.apply(params, adapter)}, x)
    np.testing.assert_allclose(ev, weight, rtol=1e-5, atol=1e-5)


def test_fact_dropout_sits_on_the_rank_r_activation():
    cfg, params, _ = _tiny()
    method = _method("fact_tt", rank=3, dropout=0.1)
    _, side = activation_form(method, params, _adapter(method, params))
    for m, path in side[0].items():
        assert path.dropout == 0.1 and path.dropout_after == 1, m
        # rank-r after the core (3·r for the fused q|k|v path, k·r for fc1)
        assert path.factors[1].shape[1] == {"qkv": 3 * 3, "fc1": 3 * 4}.get(m, 3), m
    assert set(side[0]) == {"qkv", "o", "fc1", "fc2"}  # q, k, v share x: one fused path


def test_weight_form_methods_raise_a_clear_error():
    _, params, _ = _tiny()
    for name in ("rlrr", "bitfit", "linear", "full"):
        try:
            method = get_method(name)
        except ImportError:
            continue
        assert not supports_activation_form(method)
        with pytest.raises(ValueError, match="weight form"):
            activation_form(method, params, {})


# A smoke test of a developer script (20 s of CI in a subprocess): `pytest -m extended`.
@pytest.mark.extended
def test_benchmark_runs_and_writes_json(tmp_path):
    """The benchmark's code path in seconds: the tiny --quick model, scanned, one method (activation
    form), one timed round. (`python scripts/benchmark.py --quick` runs every method,
    unrolled or with --scan, as a manual smoke test.)"""
    out = tmp_path / "bench.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--quick", "--scan",
                           "--methods", "fact_tt", "--runs", "1", "--warmup", "0", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("forward_s", "floor_s", "full_s"):
        assert res[key] > 0
    assert set(res["methods"]) == {"fact_tt"} and res["methods"]["fact_tt"]["form"] == "activation"
    for name, row in res["methods"].items():
        for key in ("step_s", "gflops", "peak_bytes", "compile_s"):
            assert row[key] > 0, (name, key)
        assert row["page_faults"] >= 0
    assert res["targets"] and res["config"]["scan"] is True
    assert res["cost"]["functions"]["fact_tt"]["side_forward_gflops"] > 0  # the scanned blocks' products
    import importlib.util  # the real reason the PyTorch comparison is skipped, not "--no-torch"
    torch_there = all(importlib.util.find_spec(m) is not None for m in ("torch", "timm"))
    assert res["torch"]["skipped"] == ("--quick (compared at full size only)" if torch_there
                                       else "torch/timm not installed")


def test_benchmark_counts_the_products_of_a_jaxpr():
    """scripts/benchmark.py's matmul_flops (the side paths' products, for the FLOPs figures): 2 per
    multiply-add, inside jit and custom_vjp, a scan's body times its length, no element-wise op."""
    code = """
import sys, jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
from benchmark import matmul_flops
x, w, v = jnp.ones((5, 3)), jnp.ones((3, 4)), jnp.ones((4, 2))
def f(x, w):
    h = jax.jit(lambda a, b: jnp.tanh(a @ b))(x, w)
    return jax.lax.scan(lambda c, _: (c @ jnp.eye(4), None), h, None, length=3)[0] @ v
print(matmul_flops(f, x, w))
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) == 2 * (5 * 3 * 4 + 3 * 5 * 4 * 4 + 5 * 4 * 2)


def test_efft_factor_dropout_matches_weight_form_with_the_same_key():
    cfg, params, x = _tiny()
    model = jax_peft.ViT(cfg)
    method = _method("efft", rank=3, scale=2.0, dropout=0.3)
    adapter = _adapter(method, params)
    key = jax.random.PRNGKey(4)
    weight = model.apply({"params": method.apply(params, adapter, rng=key)}, x, train=True,
                         rngs={"dropout": key})
    p, side = activation_form(method, params, adapter, rng=key)
    act = model.apply({"params": p}, x, train=True, side=side, rngs={"dropout": key})
    np.testing.assert_allclose(act, weight, rtol=1e-5, atol=1e-5)
    assert all(path.dropout == 0.0 for blk in side.values() for path in blk.values())


def test_side_path_chunked_factor_equals_block_diagonal():
    from jax_peft.vit import SidePath, _chunked_matmul

    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    u, t1, v = (jax.random.normal(k1, (6, 2)), jax.random.normal(k2, (2, 8)), jax.random.normal(k3, (2, 6)))
    x = jax.random.normal(k4, (5, 6))
    dense = u @ t1 @ jnp.kron(jnp.eye(4), v)  # fc1-style (6, 24)
    np.testing.assert_allclose(SidePath((u, t1, v)).increment(), dense, rtol=1e-5, atol=1e-5)
    h = x
    for f in (u, t1, v):
        h = _chunked_matmul(h, f)
    np.testing.assert_allclose(h, x @ dense, rtol=1e-5, atol=1e-5)
    # fc2-style: the first factor acts on chunks of the input, so the dense form needs d_in
    t2 = jax.random.normal(k2, (8, 2))
    dense2 = jnp.kron(jnp.eye(4), u) @ t2 @ v  # (24, 6)
    np.testing.assert_allclose(SidePath((u, t2, v)).increment(d_in=24), dense2, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        _chunked_matmul(jnp.ones((2, 7)), jnp.ones((3, 2)))


def test_lora_fused_qkv_shares_one_input_dropout_mask():
    cfg, params, x = _tiny()
    method = _method("lora", rank=3, variant="fused_qkv", dropout=0.5)
    _, side = activation_form(method, params, _adapter(method, params))
    assert set(side) == {0, 1} and all(set(s) == {"qkv"} for s in side.values())
    path = side[0]["qkv"]
    assert path.dropout == 0.5 and path.dropout_after == -1 and path.factors[1].shape == (3, 96)


def test_forward_picks_the_form_and_checks_its_arguments():
    from jax_peft.methods.activation import forward

    cfg, params, x = _tiny()
    model = jax_peft.ViT(cfg)
    method = _method("fact_tt", rank=3, scale=2.0, dropout=0.1)
    adapter = _adapter(method, params)
    a = forward(model, method, params, adapter, x)
    w = forward(model, method, params, adapter, x, form="weight")
    np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5)
    t1 = forward(model, method, params, adapter, x, train=True, rng=jax.random.PRNGKey(3))
    assert not np.allclose(t1, a, atol=1e-4)  # auto = activation form: dropout active in training
    with pytest.raises(ValueError, match="rng"):
        forward(model, method, params, adapter, x, train=True)
    with pytest.raises(ValueError, match="execution form"):
        forward(model, method, params, adapter, x, form="merged")
    with pytest.raises(ValueError, match="weight form"):
        forward(model, get_method("rlrr"), params, {}, x, form="activation")
