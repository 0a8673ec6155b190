"""The official Swin variants of RLRR and EFFT against the official code's outputs (golden files
tests/data/swin/rlrr.npz, efft.npz: the tiny Swin of plain.npz, adapter tensors drawn to
non-trivial values; logits and the gradients of every adapter tensor and the head), through the
public API: from_official("rlrr" | "efft", ..., params=swin_params), method.apply, to_official."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import DATA

import jax_peft
from jax_peft import paths
from jax_peft.methods.activation import activation_form


@functools.cache
def _load(name: str) -> dict:
    z = np.load(DATA / "swin" / f"{name}.npz")
    p = np.load(DATA / "swin" / "plain.npz")
    meta = json.loads(str(z["meta"]))
    hp = {} if name == "rlrr" else dict(rank=meta["hyper"]["attn_rank_stage0"],
                                        mlp_rank=tuple(meta["hyper"]["mlp_rank_stage0"]), scale=meta["hyper"]["s"])
    return dict(meta=meta, hp=hp, x=z["x"], labels=z["labels"], logits=z["logits"], loss=float(z["loss"]),
                head={"kernel": z["head/weight"].T, "bias": z["head/bias"]},
                backbone={k[len("backbone/"):]: p[k] for k in p.files if k.startswith("backbone/")},
                adapter={k[len("adapter/"):]: z[k] for k in z.files if k.startswith("adapter/")},
                grads={k[len("grad/"):]: z[k] for k in z.files if k.startswith("grad/")})


def _per_tensor(ours, gold) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - gold)) / max(np.max(np.abs(gold)), 1e-4))


def _run(name: str, dtype: str, merged: bool = False):
    g = _load(name)
    params = jax_peft.swin.from_state_dict(g["backbone"], dtype=np.dtype(dtype))
    params["head"] = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), g["head"])
    adapter = jax_peft.from_official(name, g["adapter"], params=params, **g["hp"])
    method = jax_peft.get_method(f"{name}_swin", **g["hp"])
    assert method.num_params(adapter) == g["meta"]["trainable_adapter_params"]
    model = jax_peft.Swin(jax_peft.swin_config(params, image_size=32, dtype=dtype))
    x, labels = jnp.asarray(g["x"], dtype), jnp.asarray(g["labels"])

    @jax.jit
    def loss_fn(ad, head):
        logits = model.apply({"params": method.apply({**params, "head": head}, ad)}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (loss, logits), (g_ad, g_head) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(adapter, params["head"])
    grads = jax_peft.to_official(name, {"adapter": g_ad, "head": g_head}, **g["hp"])
    out = [np.asarray(logits), float(loss), grads]
    if merged:
        plain = jax_peft.merge(params, method, adapter)
        out.append(np.asarray(jax.jit(lambda p: model.apply({"params": p}, x))(plain)))
        out.append(plain)
    return out


def _check(name, logits, loss, grads, logit_tol, grad_tol):
    g = _load(name)
    assert np.max(np.abs(logits - g["logits"])) / np.max(np.abs(g["logits"])) < logit_tol
    assert abs(loss - g["loss"]) / abs(g["loss"]) < logit_tol
    assert set(grads) == set(g["grads"])
    bad = {k: e for k, v in g["grads"].items() if (e := _per_tensor(grads[k], v)) > grad_tol}
    assert not bad, bad


@pytest.mark.parametrize("name", ["rlrr", "efft"])
def test_golden_float64_exact(name):
    with jax.enable_x64(True):
        logits, loss, grads, merged_logits, plain = _run(name, "float64", merged=True)
    _check(name, logits, loss, grads, 1e-9, 1e-6)
    g = _load(name)
    assert np.max(np.abs(merged_logits - g["logits"])) / np.max(np.abs(g["logits"])) < 1e-9
    if name == "rlrr":  # the merging reduction keeps its shift as a bias
        assert "bias" in plain["layers_0"]["downsample"]["reduction"]


@pytest.mark.extended
@pytest.mark.parametrize("name", ["rlrr", "efft"])
def test_golden_float32(name):
    logits, loss, grads = _run(name, "float32")
    _check(name, logits, loss, grads, 1e-4, 1e-2)


@pytest.mark.parametrize("name", ["rlrr", "efft"])
def test_official_round_trip_and_init(name):
    g = _load(name)
    params = jax_peft.swin.from_state_dict(g["backbone"])
    adapter = jax_peft.from_official(name, g["adapter"], params=params, **g["hp"])
    back = jax_peft.to_official(name, adapter, **g["hp"])
    assert set(back) == set(g["adapter"])
    for k, v in g["adapter"].items():
        np.testing.assert_allclose(back[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    method = jax_peft.get_method(f"{name}_swin", **g["hp"])
    fresh = method.init(jax.random.PRNGKey(0), params)
    assert paths.count(fresh) == g["meta"]["trainable_adapter_params"]
    assert set(jax_peft.to_official(name, fresh, **g["hp"])) == set(g["adapter"])
    if name == "efft":  # v = 0: the pretrained function at step 0
        assert not any(np.asarray(v).any() for k, v in paths.flatten(fresh).items() if k.endswith("_v"))
    with pytest.raises(ValueError, match="missing"):
        jax_peft.from_official(name, dict(list(g["adapter"].items())[1:]), params=params, **g["hp"])
    # one name per method: the ViT class runs its Swin variant on a Swin tree
    assert paths.count(jax_peft.get_method(name, **g["hp"]).init(jax.random.PRNGKey(0), params)) == paths.count(fresh)
    with pytest.raises(ValueError, match="Swin Transformer variant"):
        method.init(jax.random.PRNGKey(0), jax_peft.param_shapes(jax_peft.vit_config("ViT-Ti/16")))


def test_swin_sites():
    params = jax_peft.swin.from_state_dict(_load("rlrr")["backbone"])
    s = jax_peft.sites.sites(params)
    assert [n for n in s if n.startswith("stage0/block1/")] == [
        "stage0/block1/ln1", "stage0/block1/qkv", "stage0/block1/q", "stage0/block1/k", "stage0/block1/v",
        "stage0/block1/o", "stage0/block1/ln2", "stage0/block1/fc1", "stage0/block1/fc2"]
    v = s["stage0/block1/v"]  # a slice site: the last third of the fused qkv's columns
    assert (v.parent, v.offset, v.shape, v.kernel) == ("stage0/block1/qkv", 64, (32, 32), None)
    assert s["stage0/block1/qkv"].shape == (32, 96) and s["stage1/block0/fc1"].shape == (64, 256)
    assert (s["stage1/block1/o"].block, s["stage1/block1/o"].stage) == (3, 1)
    assert s["stage0/merge"].kind == "merge" and s["stage0/merge"].shape == (128, 64) and s["stage0/merge"].bias is None
    assert s["patch"].shape == (48, 32) and "stage1/merge" not in s and s["final_norm"].shape == (64, 64)
    assert not any("merge_norm" in n for n in s)  # no method adapts the merging norm


def test_fact_tt_per_stage_increments():
    """FacT-TT on a Swin (the paper's per-stage reading): stage pair U_i, V_i, per-block cores, the
    increments of FacT-TT on the ViT (fused qkv = [U T_q V | U T_k V | U T_v V], chunked MLP)."""
    cfg = jax_peft.swin_config(None, embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=4, image_size=32,
                               num_classes=3)
    rng = np.random.default_rng(0)
    params = paths.unflatten({k: rng.normal(size=v.shape).astype(np.float32)
                              for k, v in paths.flatten(jax_peft.swin.param_shapes(cfg)).items()})
    method = jax_peft.get_method("fact_tt_swin", rank=2, scale=0.5)
    fresh = method.init(jax.random.PRNGKey(1), params)
    assert paths.count(fresh) == 2 * 2 * (8 + 16) + 4 * 12 * 4  # 2r·ΣD_i + 12r²·L
    eff0 = method.apply(params, fresh)  # V = 0: the pretrained function
    np.testing.assert_array_equal(np.asarray(eff0["layers_1"]["blocks_0"]["attn"]["qkv"]["kernel"]),
                                  params["layers_1"]["blocks_0"]["attn"]["qkv"]["kernel"])
    ad = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32), fresh)
    eff = method.apply(params, ad)
    u, v, t = ad["layers_1"]["fact"]["U"], ad["layers_1"]["fact"]["V"], ad["layers_1"]["blocks_1"]["fact"]
    blk, old = eff["layers_1"]["blocks_1"], params["layers_1"]["blocks_1"]
    want = {"attn/qkv": np.concatenate([u @ t[x] @ v for x in "qkv"], 1), "attn/proj": u @ t["o"] @ v,
            "mlp/fc1": u @ t["fc1"] @ np.kron(np.eye(4), v), "mlp/fc2": np.kron(np.eye(4), u) @ t["fc2"] @ v}
    for name, delta in want.items():
        got = np.asarray(paths.get(blk, f"{name}/kernel")) - paths.get(old, f"{name}/kernel")
        np.testing.assert_allclose(got, 0.5 * delta, atol=1e-4 * np.abs(delta).max(), err_msg=name)


@pytest.mark.extended
def test_efft_factor_dropout_in_training_only():
    g = _load("efft")
    params = jax_peft.swin.from_state_dict(g["backbone"])
    adapter = jax_peft.from_official("efft", g["adapter"], params=params, **g["hp"])
    method = jax_peft.get_method("efft_swin", **g["hp"])
    kernel = lambda t: np.asarray(t["layers_0"]["blocks_1"]["mlp"]["fc1"]["kernel"])
    ev = kernel(method.apply(params, adapter))
    a, b, c = (kernel(method.apply(params, adapter, rng=jax.random.PRNGKey(s))) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - ev).max() > 0 and np.abs(a - c).max() > 0
    off = jax_peft.get_method("efft_swin", **g["hp"], dropout=0.0)
    np.testing.assert_array_equal(kernel(off.apply(params, adapter, rng=jax.random.PRNGKey(0))), ev)


def _tiny_swin(seed: int = 0):
    cfg = jax_peft.swin_config(None, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, image_size=32,
                               num_classes=3)
    rng = np.random.default_rng(seed)
    params = paths.unflatten({k: (0.3 * rng.normal(size=v.shape)).astype(np.float32)
                              for k, v in paths.flatten(jax_peft.swin.param_shapes(cfg)).items()})
    return cfg, params


@functools.cache
def _tiny_logits():
    cfg, _ = _tiny_swin()
    return jax.jit(lambda p, x, side: jax_peft.Swin(cfg).apply({"params": p}, x, side=side))


_SMALL = {"fact_tt": dict(rank=4), "fact_tk": dict(rank=4), "fact_tt_swin": dict(rank=4),
          "fact_tk_swin": dict(rank=4), "lora": dict(rank=4)}


def test_every_method_adapts_a_swin():
    """No silent no-op: every registered method builds an adapter with parameters on a Swin tree
    (the linear probe trains only the head), by shapes alone."""
    _, params = _tiny_swin()
    for name in jax_peft.method_names():
        method = jax_peft.get_method(name, **_SMALL.get(name, {}))
        n = paths.count(jax.eval_shape(lambda p, m=method: m.init(jax.random.PRNGKey(0), p), params))
        assert (n == 0) if name == "linear" else (n > 0), name


_COVERED = ("rlrr", "efft", "ssf", "bitfit", "full", "linear")  # golden / test_swin.py cover these; extended here


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.extended) if n in _COVERED else n
                                  for n in jax_peft.method_names() if not n.endswith("_swin")])  # aliases: below
def test_every_method_on_swin_trains_and_merges(name):
    """Every method's weight form, its activation form (the training forward) and the merged plain
    tree give the same logits on a Swin, and the adapter changes them."""
    _, params = _tiny_swin()
    method = jax_peft.get_method(name, **_SMALL.get(name, {}))
    fresh = method.init(jax.random.PRNGKey(0), params)
    rng = np.random.default_rng(1)
    adapter = jax.tree_util.tree_map(lambda a: np.asarray(a) + 0.1 * rng.normal(size=np.shape(a)).astype(np.float32),
                                     fresh)
    f = _tiny_logits()
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
    base = f(params, x, {})
    weight = f(method.apply(params, adapter), x, {})
    merged = f(jax_peft.merge(params, method, adapter), x, {})
    if method.has_activation_form():  # the training step's form: side paths at the qkv / o / fc1 / fc2 hooks
        folded, side = activation_form(method, params, adapter)
        assert set(side) == {0, 1, 2, 3}  # every block has a hook (LoRA: its q and v paths on the qkv hook)
        if name == "lora":
            assert all(isinstance(hooks["qkv"], tuple) and len(hooks["qkv"]) == 2 for hooks in side.values())
            assert folded is params  # nothing folds into the frozen weights
        auto = f(folded, x, side)
    else:
        auto = weight
    scale = float(jnp.abs(weight).max())
    np.testing.assert_allclose(merged, weight, atol=1e-5 * scale)
    np.testing.assert_allclose(auto, weight, atol=1e-5 * scale)
    if name != "linear":
        assert float(jnp.abs(weight - base).max()) > 1e-3 * scale


def test_one_name_per_method_on_swin():
    """rlrr / efft / fact_tt / fact_tk on a Swin tree run their Swin variants; ViT-only options raise,
    naming the method, the backbone and the variant's options; LoRA's q, v are slices of the fused qkv."""
    _, params = _tiny_swin()
    for name in ("rlrr", "efft", "fact_tt", "fact_tk"):
        hp = _SMALL.get(name, {})
        a, b = (jax.eval_shape(functools.partial(jax_peft.get_method(n, **hp).init, jax.random.PRNGKey(0)), params)
                for n in (name, f"{name}_swin"))
        assert paths.flatten(a) == paths.flatten(b), name
    assert jax_peft.get_method("efft", mlp_rank=(4, 8)).name == "efft_swin"  # a Swin-only option
    with pytest.raises(ValueError, match=r"rlrr on a swin backbone.*patch_ssf"):
        jax_peft.get_method("rlrr", patch_ssf=False).init(jax.random.PRNGKey(0), params)
    with pytest.raises(ValueError, match=r"efft on a swin backbone.*variant"):
        jax_peft.get_method("efft", variant="per_layer").init(jax.random.PRNGKey(0), params)
    lora = jax_peft.get_method("lora", rank=2)
    ad = jax.tree_util.tree_map(lambda a: a + 1.0, lora.init(jax.random.PRNGKey(0), params))
    assert sorted(ad["layers_0"]["blocks_0"]["attn"]) == ["q", "v"]
    eff = lora.apply(params, ad)
    delta = np.asarray(eff["layers_0"]["blocks_0"]["attn"]["qkv"]["kernel"]) - params["layers_0"]["blocks_0"]["attn"]["qkv"]["kernel"]
    q = ad["layers_0"]["blocks_0"]["attn"]["q"]
    np.testing.assert_allclose(delta[:, :16], q["lora_a"] @ q["lora_b"], rtol=1e-5)
    assert not delta[:, 16:32].any() and delta[:, 32:].any()  # k untouched, v adapted


def test_lora_dropout_reaches_the_q_and_v_slices_of_a_swin():
    """LoRA's q and v on a Swin are slices of the fused qkv layer; in training each is its own side
    path with its own input-dropout mask, as on the ViT (not folded into the weights without dropout)."""
    cfg, params = _tiny_swin()
    method = jax_peft.get_method("lora", rank=4, dropout=0.5)
    adapter = jax.tree_util.tree_map(lambda a: np.asarray(a) + 0.1, method.init(jax.random.PRNGKey(0), params))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
    model = jax_peft.Swin(cfg)

    def logits(side, train, key=0):
        return model.apply({"params": params}, x, side=side, train=train, rngs={"dropout": jax.random.PRNGKey(key)})

    folded, side = activation_form(method, params, adapter)
    q, v = side[0]["qkv"]
    assert folded is params and q.dropout == v.dropout == 0.5
    d = cfg.embed_dim
    assert q.columns == (0, 3 * d) and v.columns == (2 * d, 3 * d)  # q: columns [0, d); v: [2d, 3d)
    assert q.factors[-1].shape[-1] == v.factors[-1].shape[-1] == d  # each path stays d wide
    # Only the side paths can make train mode differ (the tiny Swin has no dropout or drop path of its own).
    plain = {b: {} for b in side}
    np.testing.assert_array_equal(logits(plain, True), logits(plain, False))
    train = logits(side, True)
    assert float(jnp.abs(train - logits(side, False)).max()) > 1e-3
    assert float(jnp.abs(train - logits(side, True, key=1)).max()) > 1e-3
