"""FacT-TT, FacT-TK and EFFT: parity with the official PyTorch code (tests/data golden files), official
import/export, options (blocks, mlp_layout, variant, init string), EFFT factor dropout and errors.

Golden parity runs twice per file through the public API (from_official -> apply -> ViT):
* float32, as users run it: logits to 1e-4 of the largest logit, loss to 1e-5, and every gradient
  tensor with the per-tensor metric below 1e-2. The golden FacT models (s = 10) drive q and k to
  ~500, so attention logits reach ~1e6 and the softmax saturates: float32 round-off of the logits
  themselves (~0.1 absolute) perturbs the non-dominant probabilities by a few per cent, which bounds
  any float32 implementation near 5e-3 on the attention cores. (The ViT's `stable_softmax` removes
  the larger, avoidable error of the standard softmax backward, which was ~1.2 on block 1's cores.)
  The strict per-tensor 1e-3 metric is checked in float64, where the formulas agree to ~1e-9.
* float64 (jax x64), to check the math: every gradient tensor with the per-tensor metric
  max|ours - golden| / max(max|golden|, 1e-4) < 1e-6, logits to 1e-9.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import DATA, random_params, tiny_vit_config
from formula import formula_input, formula_params

import jax_peft
from jax_peft import paths
from jax_peft import sites as layers
from jax_peft.methods import lowrank as lr

GOLDEN = ["fact_tt_r8_s10_d2", "fact_tk_r8_s10_d2", "efft_r16_s1_d3"]
KEY = jax.random.PRNGKey(0)


def _load(name: str) -> dict:
    z = np.load(DATA / f"{name}.npz")
    meta = json.loads(str(z["meta"]))
    return dict(meta=meta, logits=z["logits"], loss=float(z["loss"]),
                adapter={k[len("adapter/"):]: z[k] for k in z.files if k.startswith("adapter/")},
                grads={k[len("grad/"):]: z[k] for k in z.files if k.startswith("grad/")})


def _run_golden(g: dict, dtype) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
    """Logits, loss and official-layout gradients (adapter + head) through the public API."""
    meta = g["meta"]
    hp = dict(rank=meta["rank"], scale=meta["scale"])
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), formula_params(meta["depth"]))
    method = jax_peft.get_method(meta["method"], **hp)
    adapter = jax_peft.from_official(meta["method"], g["adapter"], params=params, **hp)
    model = jax_peft.ViT(jax_peft.vit_config(params, dtype=jnp.dtype(dtype).name))
    x, labels = formula_input()
    x = jnp.asarray(x, dtype)

    @jax.jit
    def loss_fn(adapter, head):
        logits = model.apply({"params": method.apply({**params, "head": head}, adapter)}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean(), logits

    (loss, logits), (g_ad, g_head) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        adapter, params["head"])
    grads = jax_peft.to_official(meta["method"], g_ad, **hp)
    grads["head.weight"] = np.asarray(g_head["kernel"]).T
    grads["head.bias"] = np.asarray(g_head["bias"])
    return np.asarray(logits), float(loss), grads


def _per_tensor(ours: np.ndarray, gold: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - gold)) / max(np.max(np.abs(gold)), 1e-4))


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_float32(name):
    g = _load(name)
    logits, loss, grads = _run_golden(g, jnp.float32)
    assert np.max(np.abs(logits - g["logits"])) / np.max(np.abs(g["logits"])) < 1e-4
    assert abs(loss - g["loss"]) / abs(g["loss"]) < 1e-5
    assert set(grads) >= set(g["grads"])  # TK export pads P; every golden tensor is present
    err = {k: _per_tensor(grads[k], v) for k, v in g["grads"].items()}
    assert max(err.values()) < 1e-2, err


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_float64_exact(name):
    g = _load(name)
    with jax.enable_x64(True):
        logits, loss, grads = _run_golden(g, jnp.float64)
    assert logits.dtype == np.float64
    assert np.max(np.abs(logits - g["logits"])) / np.max(np.abs(g["logits"])) < 1e-9
    assert abs(loss - g["loss"]) / abs(g["loss"]) < 1e-9
    bad = {k: e for k, v in g["grads"].items() if (e := _per_tensor(grads[k], v)) > 1e-6}
    assert not bad, bad


# --- official import / export --------------------------------------------------------------------
@functools.cache
def _formula_shapes(depth: int) -> dict:
    """The formula checkpoint's canonical tree (numpy; cached, never modified)."""
    return formula_params(depth)


@pytest.mark.parametrize("name", GOLDEN)
def test_official_round_trip(name):
    g = _load(name)
    meta = g["meta"]
    hp = dict(rank=meta["rank"], scale=meta["scale"])
    params = _formula_shapes(meta["depth"])
    adapter = jax_peft.from_official(meta["method"], g["adapter"], params=params, **hp)
    back = jax_peft.to_official(meta["method"], adapter, **hp)
    assert set(back) == set(g["adapter"])
    for k, v in g["adapter"].items():
        if k == "FacTp":  # depth 2 uses the first 24 of the official 144 columns; the rest export as 0
            n = 12 * meta["depth"]
            np.testing.assert_allclose(back[k][:, :n], v[:, :n], rtol=1e-6, atol=1e-7)
            assert back[k].shape == v.shape and not back[k][:, n:].any()
        else:
            np.testing.assert_allclose(back[k], v, rtol=1e-6, atol=1e-7)
    # unrelated keys (backbone, head, wrapper prefixes) are ignored
    extra = {"head.weight": np.zeros((10, 768)), "blocks.0.attn.qkv.weight": np.zeros((2304, 768)),
             **{f"module.{k}": v for k, v in g["adapter"].items()}}
    again = jax_peft.from_official(meta["method"], extra, params=params, **hp)
    for a, b in zip(jax.tree_util.tree_leaves(adapter), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_official_state_dict_errors_list_every_problem():
    g = _load("fact_tt_r8_s10_d2")
    params = _formula_shapes(2)
    sd = dict(g["adapter"])
    del sd["blocks.1.attn.k_FacTs.weight"]
    sd["FacTv.weight"] = np.zeros((768, 4))
    sd["blocks.7.attn.q_FacTs.weight"] = np.zeros((8, 8))
    with pytest.raises(ValueError) as e:
        jax_peft.from_official("fact_tt", sd, params=params, rank=8)
    msg = str(e.value)
    for part in ("blocks.1.attn.k_FacTs.weight", "FacTv.weight", "blocks.7.attn.q_FacTs.weight", "rank"):
        assert part in msg
    with pytest.raises(ValueError, match="FacTu.weight"):  # wrong rank: shapes named with the fix
        jax_peft.from_official("fact_tt", g["adapter"], params=params, rank=4)
    with pytest.raises(ValueError, match="params"):
        jax_peft.from_official("fact_tt", g["adapter"], rank=8)
    # MLP cores are unknown to an attention-only method: refused, not silently dropped
    with pytest.raises(ValueError, match="fc1_FacTs"):
        jax_peft.from_official("fact_tt", g["adapter"], params=params, rank=8, blocks="mhsa")


def test_fact_tk_official_p_columns():
    g = _load("fact_tk_r8_s10_d2")
    sd = dict(g["adapter"])
    # 12 columns per block are needed: depth 2 needs 24; 20 columns is an error naming FacTp
    with pytest.raises(ValueError, match="FacTp"):
        jax_peft.from_official("fact_tk", {**sd, "FacTp": sd["FacTp"][:, :20]}, params=_formula_shapes(2), rank=8)
    # exactly 24 columns suffice; the export pads back to the official 144
    ad = jax_peft.from_official("fact_tk", {**sd, "FacTp": sd["FacTp"][:, :24]}, params=_formula_shapes(2), rank=8)
    assert ad["P"].shape == (8, 24)
    assert jax_peft.to_official("fact_tk", ad, rank=8)["FacTp"].shape == (8, 144)
    # blocks="mhsa" keeps 4 columns per block; refuses to drop non-zero official MLP columns
    with pytest.raises(ValueError, match="blocks='all'"):
        jax_peft.from_official("fact_tk", sd, params=_formula_shapes(2), rank=8, blocks="mhsa")
    p = np.array(sd["FacTp"]).reshape(8, 12, 12)
    p[:, :, 4:] = 0
    ad = jax_peft.from_official("fact_tk", {**sd, "FacTp": p.reshape(8, 144)}, params=_formula_shapes(2),
                                rank=8, blocks="mhsa")
    np.testing.assert_array_equal(np.asarray(ad["P"]).reshape(8, 2, 4), p[:, :2, :4])
    out = jax_peft.to_official("fact_tk", ad, rank=8, blocks="mhsa")["FacTp"]
    np.testing.assert_array_equal(out, np.concatenate([p[:, :2], np.zeros((8, 10, 12))], 1).reshape(8, 144))


# --- options on a tiny model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_vit_config()  # width 32, MLP 64 (ratio 2), depth 2
    return cfg, random_params(cfg)


def _nonzero_adapter(method, params, seed=1):
    """init, with every zero-initialized factor replaced by random values (so increments are non-zero)."""
    ad = method.init(jax.random.PRNGKey(seed), params)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 16))
    return {k: (0.3 * jax.random.normal(next(keys), v.shape) if not np.any(np.asarray(v)) else v)
            for k, v in ad.items()}


def _changed(params, eff) -> set[tuple[int, str]]:
    out = set()
    for i in range(layers.num_blocks(params)):
        for m in layers.MODULES:
            p = f"{layers.module_path(i, m)}/kernel"
            if not np.allclose(np.asarray(paths.get(params, p)), np.asarray(paths.get(eff, p))):
                out.add((i, m))
    return out


@pytest.mark.parametrize("name", ["fact_tt", "fact_tk"])
@pytest.mark.parametrize("blocks,mods", [("all", layers.MODULES), ("mhsa", ("q", "k", "v", "o")),
                                         ("ffn", ("fc1", "fc2"))])
def test_fact_blocks_adapt_only_their_matrices(tiny, name, blocks, mods):
    _, params = tiny
    method = jax_peft.get_method(name, rank=4, scale=2.0, blocks=blocks)
    ad = _nonzero_adapter(method, params)
    eff = method.apply(params, ad)
    assert _changed(params, eff) == {(i, m) for i in range(2) for m in mods}
    # every other leaf is untouched
    for p, v in paths.flatten(params).items():
        if not p.endswith("kernel") or "encoderblock" not in p:
            np.testing.assert_array_equal(np.asarray(paths.get(eff, p)), v)


def test_fact_tt_chunked_mlp_increments(tiny):
    """fc1 column block i = s U T1[:, i r:(i+1) r] V; fc2 row block i = s U T2[i r:(i+1) r] V (k = 2)."""
    _, params = tiny
    method = jax_peft.get_method("fact_tt", rank=4, scale=3.0)
    ad = _nonzero_adapter(method, params)
    eff = method.apply(params, ad)
    u, v, r, d = np.asarray(ad["U"]), np.asarray(ad["V"]), 4, 32
    for i in range(2):
        t1, t2 = np.asarray(ad["fc1"][i]), np.asarray(ad["fc2"][i])
        d1 = np.asarray(paths.get(eff, f"{layers.module_path(i, 'fc1')}/kernel")) - \
            np.asarray(paths.get(params, f"{layers.module_path(i, 'fc1')}/kernel"))
        d2 = np.asarray(paths.get(eff, f"{layers.module_path(i, 'fc2')}/kernel")) - \
            np.asarray(paths.get(params, f"{layers.module_path(i, 'fc2')}/kernel"))
        for j in range(2):
            np.testing.assert_allclose(d1[:, j * d:(j + 1) * d], 3.0 * u @ t1[:, j * r:(j + 1) * r] @ v, atol=2e-5)
            np.testing.assert_allclose(d2[j * d:(j + 1) * d], 3.0 * u @ t2[j * r:(j + 1) * r] @ v, atol=2e-5)


def test_fact_tk_mlp_layouts(tiny):
    """"paper" uses each core slice for one square block; "official" mixes them (C-order reshape).
    Attention increments are the same in both; the logits differ."""
    cfg, params = tiny
    off = jax_peft.get_method("fact_tk", rank=4, scale=2.0)
    pap = dataclasses.replace(off, mlp_layout="paper")
    ad = _nonzero_adapter(off, params)
    e_off, e_pap = off.apply(params, ad), pap.apply(params, ad)
    for m in ("q", "k", "v", "o"):
        p = f"{layers.module_path(1, m)}/kernel"
        np.testing.assert_array_equal(np.asarray(paths.get(e_off, p)), np.asarray(paths.get(e_pap, p)))
    # paper layout, block 1: fc1 column block i = s U M[:, :, i] V, fc2 row block i = s U M[:, :, k+i] V
    u, v, c = np.asarray(ad["U"], np.float64), np.asarray(ad["V"], np.float64), np.asarray(ad["C"], np.float64)
    pb = np.asarray(ad["P"], np.float64).reshape(4, 2, 8)[:, 1]
    mlp = np.einsum("abc,cj->abj", c, pb)[:, :, 4:]
    d1 = np.asarray(paths.get(e_pap, f"{layers.module_path(1, 'fc1')}/kernel")) - \
        np.asarray(paths.get(params, f"{layers.module_path(1, 'fc1')}/kernel"))
    d2 = np.asarray(paths.get(e_pap, f"{layers.module_path(1, 'fc2')}/kernel")) - \
        np.asarray(paths.get(params, f"{layers.module_path(1, 'fc2')}/kernel"))
    for i in range(2):
        np.testing.assert_allclose(d1[:, 32 * i:32 * (i + 1)], 2.0 * u @ mlp[:, :, i] @ v, atol=2e-5)
        np.testing.assert_allclose(d2[32 * i:32 * (i + 1)], 2.0 * u @ mlp[:, :, 2 + i] @ v, atol=2e-5)
    model = jax_peft.ViT(cfg)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    l_off = model.apply({"params": e_off}, x, train=False)
    l_pap = model.apply({"params": e_pap}, x, train=False)
    assert float(jnp.max(jnp.abs(l_off - l_pap))) > 1e-3


def test_inits_follow_the_official_code(tiny):
    _, params = tiny
    d, r = 32, 4
    tt = jax_peft.get_method("fact_tt", rank=r).init(KEY, params)
    assert not np.any(np.asarray(tt["V"]))
    assert np.abs(np.asarray(tt["U"])).max() <= 1 / np.sqrt(d)
    assert np.abs(np.asarray(tt["q"])).max() <= 1 / np.sqrt(r) and np.abs(np.asarray(tt["q"])).max() > 0.3 / np.sqrt(r)
    assert np.abs(np.asarray(tt["fc2"])).max() <= 1 / np.sqrt(2 * r)  # nn.Linear(k r, r), k = 2 here
    assert tt["fc1"].shape == (2, r, 2 * r) and tt["fc2"].shape == (2, 2 * r, r)
    tk = jax_peft.get_method("fact_tk", rank=r).init(KEY, params)
    assert not np.any(np.asarray(tk["V"])) and tk["P"].shape == (r, 2 * 8)
    assert np.abs(np.asarray(tk["C"])).max() <= np.sqrt(3) / r
    assert np.abs(np.asarray(tk["P"])).max() <= np.sqrt(6 / (16 + r))
    for init, zero in [("vv", ("v1", "v2")), ("vu", ("v1", "u2")), ("uv", ("u1", "v2")), ("uu", ("u1", "u2"))]:
        ad = jax_peft.get_method("efft", rank=r, init=init).init(KEY, params)
        assert {k for k, v in ad.items() if not np.any(np.asarray(v))} == set(zero)
        assert np.abs(np.asarray(ad["c1"])).max() <= np.sqrt(6 / (8 * r))
        assert np.abs(np.asarray(ad["c2"])).max() <= np.sqrt(6 / (4 * r))
    for name in ("fact_tt", "fact_tk", "efft"):
        assert jax_peft.get_method(name).head_init == "torch_linear"


@pytest.mark.parametrize("name,hp,count", [
    ("fact_tt", dict(rank=8, blocks="mhsa"), 2 * 768 * 8 + 12 * 4 * 64),
    ("fact_tt", dict(rank=8, blocks="ffn"), 2 * 768 * 8 + 12 * 8 * 64),
    ("fact_tk", dict(rank=8, blocks="mhsa"), 2 * 768 * 8 + 12 * 4 * 8 + 512),
    ("efft", dict(rank=16, variant="per_layer"), 5376 * 16 + 72 * 256),
    ("fact_tt", dict(rank=16), 61_440),
    ("fact_tk", dict(rank=32), 86_528),
    ("efft", dict(rank=32), 178_176),
])
def test_counts_vit_b16_from_shapes(name, hp, count):
    shapes = jax_peft.param_shapes(jax_peft.vit_config("ViT-B/16", num_classes=10))
    method = jax_peft.get_method(name, **hp)
    assert method.num_params(jax.eval_shape(method.init, KEY, shapes)) == count


# --- EFFT ----------------------------------------------------------------------------------------
def test_efft_shared_and_per_layer_increments(tiny):
    _, params = tiny
    shared = jax_peft.get_method("efft", rank=4, scale=2.0)
    ad = _nonzero_adapter(shared, params)
    eff = shared.apply(params, ad)
    u1, v1, c1 = (np.asarray(ad[k]) for k in ("u1", "v1", "c1"))
    u2, v2, c2 = (np.asarray(ad[k]) for k in ("u2", "v2", "c2"))
    for i in range(2):
        def delta(m):
            p = f"{layers.module_path(i, m)}/kernel"
            return layers.matrix_view(np.asarray(paths.get(eff, p)) - np.asarray(paths.get(params, p)), m)
        for j, m in enumerate(("q", "k", "v", "o")):
            np.testing.assert_allclose(delta(m), 2.0 * u1 @ c1[:, :, j] @ v1, atol=2e-5)
        np.testing.assert_allclose(delta("fc1"), 2.0 * u2 @ c2[:, :, 0] @ v2, atol=2e-5)
        np.testing.assert_allclose(delta("fc2"), 2.0 * (u2 @ c2[:, :, 1] @ v2).T, atol=2e-5)
    # per-layer: block l uses c1[:, :, 4l:4l+4] and c2[:, :, 2l:2l+2]
    per = jax_peft.get_method("efft", rank=4, scale=2.0, variant="per_layer")
    ad = _nonzero_adapter(per, params)
    assert ad["c1"].shape == (4, 4, 8) and ad["c2"].shape == (4, 4, 4)
    only1 = {**ad, "c1": ad["c1"].at[:, :, :4].set(0.0), "c2": ad["c2"].at[:, :, :2].set(0.0)}
    assert _changed(params, per.apply(params, only1)) == {(1, m) for m in layers.MODULES}


def test_efft_factor_dropout(tiny):
    _, params = tiny
    method = jax_peft.get_method("efft", rank=4, scale=1.0, dropout=0.1)
    ad = _nonzero_adapter(method, params)
    k1, k2 = jax.random.split(KEY)
    eval_ = method.apply(params, ad)
    a1, a1b, a2 = method.apply(params, ad, rng=k1), method.apply(params, ad, rng=k1), method.apply(params, ad, rng=k2)
    flat = lambda t: np.concatenate([np.ravel(v) for v in paths.flatten(t).values()])
    assert not np.allclose(flat(a1), flat(eval_))
    np.testing.assert_array_equal(flat(a1), flat(a1b))  # deterministic per key
    assert not np.allclose(flat(a1), flat(a2))
    np.testing.assert_array_equal(flat(method.apply(params, ad, rng=None)), flat(eval_))
    no_drop = dataclasses.replace(method, dropout=0.0)
    np.testing.assert_allclose(flat(no_drop.apply(params, ad, rng=k1)), flat(eval_), rtol=1e-6, atol=1e-6)

    # mask structure: attention u1 / v1 masks shared by q, k, v, o within a block, redrawn per block;
    # fc1 and fc2 draw separate masks for u2
    fac = method.factors(ad, 2, rng=k1)
    for m in ("k", "v", "o"):
        for f in (0, 2):
            np.testing.assert_array_equal(np.asarray(fac[0][m][f]), np.asarray(fac[0]["q"][f]))
    assert not np.array_equal(np.asarray(fac[0]["q"][0]), np.asarray(fac[1]["q"][0]))
    assert not np.array_equal(np.asarray(fac[0]["fc1"][0]), np.asarray(fac[0]["fc2"][2].T))
    # each dropped factor is the factor with entries zeroed or scaled by 1/(1 - p)
    u1 = np.asarray(ad["u1"])
    du = np.asarray(fac[0]["q"][0])
    kept = du != 0
    np.testing.assert_allclose(du[kept], u1[kept] / 0.9, rtol=1e-6)
    assert 0 < (~kept).sum() < kept.sum()

    # the increments are unbiased: the mean over many keys approaches the eval increment
    from jax_peft.methods.edits import lowrank_delta

    def delta_q(k):
        return lowrank_delta(method.edits(params, ad, rng=k)["block0/q"], 32)

    deltas = jax.jit(jax.vmap(delta_q))(jax.random.split(KEY, 512))
    target = np.asarray(delta_q(None))
    assert np.linalg.norm(np.asarray(deltas).mean(0) - target) / np.linalg.norm(target) < 0.1


def test_dropout_helper_scaling():
    x = jnp.ones((200_000,))
    y = np.asarray(lr.dropout(KEY, x, 0.25))
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs((y == 0).mean() - 0.25) < 0.005
    assert abs(y.mean() - 1.0) < 0.01


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fact_tt", "fact_tk", "efft"])
def test_rank_larger_than_width(tiny, name):
    _, params = tiny
    with pytest.raises(ValueError, match="rank 33 is larger than the model width 32"):
        jax_peft.get_method(name, rank=33).init(KEY, params)


@pytest.mark.parametrize("name,hp,match", [
    ("efft", dict(init="vx"), "init must be two characters"),
    ("efft", dict(init="v"), "init must be two characters"),
    ("efft", dict(variant="per_block"), "unknown variant"),
    ("fact_tt", dict(blocks="attn"), "unknown blocks"),
    ("fact_tk", dict(blocks="mlp"), "unknown blocks"),
    ("fact_tk", dict(mlp_layout="clean"), "unknown mlp_layout"),
    ("fact_tt", dict(rank=0), "positive integer"),
    ("efft", dict(dropout=1.0), "dropout"),
])
def test_bad_options(name, hp, match):
    with pytest.raises(ValueError, match=match):
        jax_peft.get_method(name, **hp)


def test_adapter_for_another_model_is_refused(tiny):
    _, params = tiny
    tt = jax_peft.get_method("fact_tt", rank=4).init(KEY, params)
    with pytest.raises(ValueError, match="expects adapter leaves"):
        jax_peft.get_method("fact_tt", rank=4, blocks="mhsa").apply(params, tt)
    ad = jax_peft.get_method("efft", rank=4).init(KEY, params)
    with pytest.raises(ValueError, match="slices"):
        jax_peft.get_method("efft", rank=4, variant="per_layer").apply(params, ad)
    tk = jax_peft.get_method("fact_tk", rank=4).init(KEY, params)
    with pytest.raises(ValueError, match="P has shape"):
        jax_peft.get_method("fact_tk", rank=4, blocks="ffn").apply(params, tk)


def test_efft_per_layer_official_cores_and_dtypes():
    """Per-layer import takes the first 4L / 2L core slices (the repository's SSF file has 48 / 24) and
    exports exactly 4L / 2L; imported adapters are float32 (float64 only under jax x64)."""
    g = _load("efft_r16_s1_d3")
    params = _formula_shapes(3)
    rng = np.random.default_rng(0)
    sd = {**g["adapter"], "EFFTc1": rng.normal(size=(16, 16, 48)), "EFFTc2": rng.normal(size=(16, 16, 24))}
    ad = jax_peft.from_official("efft", sd, params=params, rank=16, variant="per_layer")
    assert ad["c1"].shape == (16, 16, 12) and ad["c2"].shape == (16, 16, 6)
    assert all(v.dtype == jnp.float32 for v in ad.values())
    np.testing.assert_allclose(np.asarray(ad["c1"]), sd["EFFTc1"][:, :, :12], rtol=1e-6)
    out = jax_peft.to_official("efft", ad, rank=16, variant="per_layer")
    assert out["EFFTc1"].shape == (16, 16, 12) and out["EFFTc2"].shape == (16, 16, 6)
    with pytest.raises(ValueError, match="EFFTc1"):  # too few slices for depth 3
        jax_peft.from_official("efft", {**sd, "EFFTc1": sd["EFFTc1"][:, :, :8]}, params=params, rank=16,
                               variant="per_layer")
    with pytest.raises(ValueError, match="EFFTc1"):  # the released (shared) layout needs exactly 4 slices
        jax_peft.from_official("efft", sd, params=params, rank=16)
