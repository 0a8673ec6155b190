"""The Swin backbone through the public API: golden parity with timm 0.5.4's SwinTransformer (the
layout of Microsoft's released files), both state-dict layouts, buffers, sizes and window resizing.

Golden file tests/data/swin/plain.npz: a tiny Swin (32 px, patch 4, embed 32, depths (2, 2), heads
(2, 4), window 4, 10 classes) in float64, eval mode; stage 0 has a masked shifted block, stage 1 a
window clipped to its 4x4 grid. It holds logits, loss, features, every backbone gradient and the
recomputed buffers of the PyTorch model.
"""

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

# parameters with a 1000-class head (jax.eval_shape of the named configs at their native size);
# the published figures are 28.3M, 49.6M, 87.8M and 197M
SWIN_COUNTS = {"Swin-T": 28_288_354, "Swin-S": 49_606_258, "Swin-B": 87_768_224, "Swin-L": 196_532_476}


@functools.cache
def _golden() -> dict:
    z = np.load(DATA / "swin" / "plain.npz")
    return {k: z[k] for k in z.files}


def _state_dict(g: dict) -> dict[str, np.ndarray]:
    sd = {k[len("backbone/"):]: v for k, v in g.items() if k.startswith("backbone/")}
    sd["head.weight"], sd["head.bias"] = g["head/weight"], g["head/bias"]
    return sd


def _per_tensor(ours, gold) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - gold)) / max(np.max(np.abs(gold)), 1e-4))


def _run(dtype: str):
    """Logits, loss, features and Microsoft-layout gradients of every tensor, via the public API."""
    g = _golden()
    params = jax_peft.swin.from_state_dict(_state_dict(g), dtype=np.dtype(dtype))
    cfg = jax_peft.swin_config(params, image_size=32, dtype=dtype)
    model = jax_peft.Swin(cfg)
    x, labels = jnp.asarray(g["x"], dtype), jnp.asarray(g["labels"])

    @jax.jit
    def loss_fn(p):
        logits, feats = model.apply({"params": p}, x, train=False, return_features=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, feats)

    (loss, (logits, feats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return (np.asarray(logits), float(loss), np.asarray(feats),
            jax_peft.swin.to_state_dict(grads, layout="microsoft", dtype=None))


def _check(dtype: str, logit_tol: float, grad_tol: float) -> None:
    g = _golden()
    logits, loss, feats, grads = _run(dtype)
    assert logits.dtype == np.dtype(dtype)
    assert np.max(np.abs(logits - g["logits"])) / np.max(np.abs(g["logits"])) < logit_tol
    assert abs(loss - g["loss"]) / abs(g["loss"]) < logit_tol
    assert np.max(np.abs(feats - g["pre_logits"])) / np.max(np.abs(g["pre_logits"])) < logit_tol
    gold = {k[len("grad/backbone/"):]: v for k, v in g.items() if k.startswith("grad/backbone/")}
    gold.update({"head.weight": g["grad/head.weight"], "head.bias": g["grad/head.bias"]})
    assert set(grads) == set(gold)
    bad = {k: e for k, v in gold.items() if (e := _per_tensor(grads[k], v)) > grad_tol}
    assert not bad, bad


def test_golden_float64_exact():
    with jax.enable_x64(True):
        _check("float64", 1e-9, 1e-6)


def test_golden_float32():
    _check("float32", 1e-4, 1e-2)


def test_config_from_tree_and_golden_meta():
    g = _golden()
    meta = json.loads(str(g["meta"]))
    cfg = jax_peft.swin_config(jax_peft.swin.from_state_dict(_state_dict(g)), image_size=32)
    m = meta["model"]
    assert (cfg.patch_size, cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size, cfg.num_classes) == (
        m["patch_size"], m["embed_dim"], tuple(m["depths"]), tuple(m["num_heads"]), m["window_size"],
        m["num_classes"])
    assert [cfg.stage_window(i) for i in range(2)] == meta["effective_window"]
    assert [[0, cfg.stage_shift(i)] for i in range(2)] == [[0, s[1]] for s in meta["effective_shift"]]


def test_recomputed_buffers_equal_the_official_ones():
    """relative_position_index and the -100 shift mask equal the PyTorch model's buffers."""
    g = _golden()
    params = jax_peft.swin.from_state_dict(_state_dict(g))
    cfg = jax_peft.swin_config(params, image_size=32)
    sd = jax_peft.swin.to_state_dict(params, layout="microsoft", buffers=True, config=cfg)
    gold = _state_dict(g)
    assert set(sd) == set(gold)
    for k, v in gold.items():
        np.testing.assert_array_equal(sd[k], v.astype(sd[k].dtype), err_msg=k)


def test_state_dict_layouts_round_trip():
    """Microsoft layout -> tree -> timm layout (merging at the start of the next stage, head.fc) ->
    tree: the same tree; the file's buffers are ignored on the way in."""
    g = _golden()
    params = jax_peft.swin.from_state_dict(_state_dict(g))
    timm_sd = jax_peft.swin.to_state_dict(params)
    assert "layers.1.downsample.reduction.weight" in timm_sd and "head.fc.weight" in timm_sd
    assert not any(k.startswith("layers.0.downsample") or "relative_position_index" in k for k in timm_sd)
    assert timm_sd["layers.1.downsample.reduction.weight"].shape == (64, 128)
    from jax_peft.swin_checkpoint import detect_layout

    assert detect_layout(timm_sd) == "timm" and detect_layout(_state_dict(g)) == "microsoft"
    wrapped = {f"module.{k}": v for k, v in timm_sd.items()}
    for sd in (timm_sd, wrapped, {"model": _state_dict(g)}):
        back = paths.flatten(jax_peft.swin.from_state_dict(sd))
        assert set(back) == set(paths.flatten(params))
        for k, v in paths.flatten(params).items():
            np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_state_dict_errors_name_the_problem():
    g = _golden()
    with pytest.raises(ValueError, match="not a Swin Transformer state dict"):
        jax_peft.swin.from_state_dict({"blocks.0.attn.qkv.weight": np.zeros((96, 32))})
    sd = {**_state_dict(g), "layers.0.blocks.0.attn.logit_scale": np.zeros((2, 1, 1))}
    with pytest.raises(ValueError, match="logit_scale"):
        jax_peft.swin.from_state_dict(sd)
    params = jax_peft.swin.from_state_dict(_state_dict(g))
    with pytest.raises(ValueError, match="image_size=64"):
        jax_peft.Swin(jax_peft.swin_config(params, image_size=32)).apply(
            {"params": params}, np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="multiple of its window"):
        jax_peft.swin_config("Swin-B", image_size=256)


# trainable counts without the head of the official Swin variants (issue 14; SSF at its official Swin
# placements: patch conv and norm, norm1, qkv, proj, norm2, fc1, fc2, final norm; EFFT: released setters,
# Swin-B rank 4, MLP (2, 4); Swin-S (4, (4, 8)); Swin-L (8, (8, 16)); (4, (4, 8)) on Swin-B is the paper's 0.49M)
METHOD_COUNTS = {
    "Swin-B": {("rlrr_swin", ()): 358_144, ("efft_swin", ()): 291_728, ("efft_swin", (("mlp_rank", (4, 8)),)): 497_792,
               ("ssf", ()): 267_264, ("bitfit", ()): 137_216, ("linear", ()): 0,
               ("fact_tt_swin", (("rank", 16),)): 135_168},
    "Swin-S": {("efft_swin", (("mlp_rank", (4, 8)),)): 378_112},
    "Swin-L": {("efft_swin", (("rank", 8), ("mlp_rank", (8, 16)))): 1_512_448},
    "Swin-T": {},
}


@pytest.mark.parametrize("name", sorted(SWIN_COUNTS))
def test_named_parameter_counts(name):
    cfg = jax_peft.swin_config(name)
    assert (cfg.patch_size, cfg.window_size, cfg.image_size, cfg.num_classes) == (4, 7, 224, 1000)
    shapes = jax_peft.swin.param_shapes(cfg)
    assert paths.count(shapes) == SWIN_COUNTS[name]
    for (method, hp), count in METHOD_COUNTS[name].items():
        m = jax_peft.get_method(method, **dict(hp))
        assert paths.count(jax.eval_shape(lambda p, m=m: m.init(jax.random.PRNGKey(0), p), shapes)) == count, (
            method, hp)


def test_named_configs_at_384_and_aliases():
    cfg = jax_peft.swin_config("swin_base_patch4_window12_384")
    assert (cfg.name, cfg.window_size, cfg.image_size, cfg.embed_dim) == ("Swin-B-384", 12, 384, 128)
    assert jax_peft.swin_config("swin-l").name == "Swin-L"
    assert [cfg.stage_window(i) for i in range(4)] == [12, 12, 12, 12]
    assert [cfg.stage_shift(i) for i in range(4)] == [6, 6, 6, 0]
    # Swin-B at 224: the last stage is 7x7 = one window, so its odd blocks do not shift
    assert [jax_peft.swin_config("Swin-B").stage_shift(i) for i in range(4)] == [3, 3, 3, 0]


def test_bias_table_resize_follows_timm_rule():
    from jax_peft.swin_checkpoint import _progression_positions, resize_bias_table

    rng = np.random.default_rng(0)
    table = rng.normal(size=(13 * 13, 4)).astype(np.float32)
    assert resize_bias_table(table, 7) is table
    big = resize_bias_table(table, 12)
    assert big.shape == (23 * 23, 4) and big.dtype == np.float32
    src, dst = table.reshape(13, 13, 4), big.reshape(23, 23, 4)
    np.testing.assert_allclose(dst[11, 11], src[6, 6], rtol=1e-6)  # offset 0 stays at the centre
    np.testing.assert_allclose(dst[11, 12], src[6, 7], rtol=1e-6)  # offset 1 is a source point too
    pos = _progression_positions(13, 23)  # 0, ±1, ±(1 + q), ... reaching about ±11
    assert pos[6] == 0 and pos[7] == 1 and 10.5 < pos[-1] < 11.5 and np.all(np.diff(pos) > 0)
    # a table that is linear in the offsets stays linear inside the source range
    lin = np.stack(np.meshgrid(pos, pos, indexing="ij"), -1).reshape(169, 2) @ np.array([[1.0], [2.0]])
    out = resize_bias_table(lin, 12).reshape(23, 23)
    r = np.arange(-11, 12)
    inside = np.abs(r) <= pos[-1]
    want = r[:, None] + 2.0 * r[None, :]
    np.testing.assert_allclose(out[np.ix_(inside, inside)], want[np.ix_(inside, inside)], atol=1e-9)


def test_adapt_to_config_resizes_windows_and_resets_head():
    cfg7 = jax_peft.swin_config(None, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=2,
                                image_size=32, num_classes=3)
    params = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), jax_peft.swin.param_shapes(cfg7))
    cfg = cfg7.replace(window_size=4, num_classes=5)
    out = jax_peft.swin.adapt_to_config(params, cfg)
    assert out["layers_0"]["blocks_0"]["attn"]["relative_position_bias_table"].shape == (49, 1)
    assert out["head"]["kernel"].shape == (32, 5) and not out["head"]["kernel"].any()
    with pytest.raises(ValueError, match="missing"):
        jax_peft.swin.validate_params({k: v for k, v in out.items() if k != "norm"}, cfg)


@pytest.mark.extended
def test_train_mode_drop_path_bf16_and_remat():
    """On a one-stage Swin (a masked shifted block): bf16 compute with remat stays close to float32
    in eval mode; drop path acts in training only, deterministic per key; gradients are finite."""
    cfg32 = jax_peft.swin_config(None, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4,
                                 image_size=32, num_classes=3)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=v.shape).astype(np.float32) * (0.3 if v.ndim > 1 else 0.1) + (k.endswith("scale"))
              for k, v in paths.flatten(jax_peft.swin.param_shapes(cfg32)).items()}
    params = paths.unflatten(params)
    x = jnp.asarray(rng.uniform(-1, 1, size=(2, 32, 32, 3)), jnp.float32)
    ref = np.asarray(jax.jit(lambda p: jax_peft.Swin(cfg32).apply({"params": p}, x))(params))
    model = jax_peft.Swin(cfg32.replace(drop_path_rate=0.5, dtype="bfloat16", remat=True))

    @jax.jit
    def run(p, key):
        ev = model.apply({"params": p}, x, train=False)
        train = lambda q: model.apply({"params": q}, x, train=True, rngs={"dropout": key})
        out, vjp = jax.vjp(train, p)
        return ev, out, vjp(jnp.ones_like(out))[0]

    (ev, t0, grads), (_, t0b, _), (_, t1, _) = [jax.tree_util.tree_map(np.asarray, run(params, jax.random.PRNGKey(s)))
                                                for s in (0, 0, 1)]
    assert ev.dtype == np.float32 and np.abs(ev - ref).max() < 0.05 * np.abs(ref).max()
    np.testing.assert_array_equal(t0, t0b)
    assert np.abs(t0 - ev).max() > 0.05 * np.abs(ref).max() and np.abs(t0 - t1).max() > 0.05 * np.abs(ref).max()
    assert all(np.isfinite(v).all() and v.any() for v in jax.tree_util.tree_leaves(grads))
