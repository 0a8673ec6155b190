"""Checkpoint layer: layouts, save/load, timm's npz layout, validation, posemb resize, bad inputs,
download cache (against a local http.server only; no real network)."""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import scipy.ndimage
import scipy.special

import jax_peft
from jax_peft import checkpoint as ckpt
from jax_peft import download, paths
from jax_peft.lazy_npz import LazyArray

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch):
    """The local test servers must be reached directly even where an HTTP proxy is configured."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")


# ----------------------------------------------------------------------------------------- helpers


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in paths.flatten(tree).items()}


def _assert_same_tree(a, b, exact=True):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].shape == fb[k].shape, k
        assert fa[k].dtype == np.float32, k
        if exact:
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
        else:
            np.testing.assert_allclose(fa[k], fb[k], rtol=1e-6, atol=1e-6, err_msg=k)


def _logits(params, x, cfg=None):
    cfg = cfg or jax_peft.vit_config(params)
    return np.asarray(jax_peft.ViT(cfg).apply({"params": params}, x, train=False))


_PRE_LINEN = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
              "MlpBlock_0": "MlpBlock_3"}


def _pre_linen_flat(tree) -> dict:
    """Independent writer of the original layout (checkpoints.md section 4 table)."""
    out = {}
    for k, v in _flat(tree).items():
        parts = k.split("/")
        if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
            parts[2] = _PRE_LINEN.get(parts[2], parts[2])
        out["/".join(parts)] = v
    return out


def _big_vision_flat(tree, *, scan=False, prefix="params/") -> dict:
    """big_vision layout (section 5): prefix, top-level pos_embedding without CLS slot, CLS row folded
    into `cls`, Linen names; optionally scan-stacked blocks."""
    flat = _flat(tree)
    pe = flat.pop("Transformer/posembed_input/pos_embedding")
    flat["cls"] = flat["cls"] + pe[:, :1]
    flat["pos_embedding"] = pe[:, 1:]
    if scan:
        depth = len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")})
        rests = sorted({k.split("/", 2)[2] for k in flat if k.startswith("Transformer/encoderblock_0/")})
        for rest in rests:
            flat[f"Transformer/encoderblock/{rest}"] = np.stack(
                [flat.pop(f"Transformer/encoderblock_{i}/{rest}") for i in range(depth)])
    return {prefix + k: v for k, v in flat.items()}


def _save_flat(path: Path, flat: dict) -> Path:
    np.savez(path, **flat)
    return path


# --------------------------------------------------------------------------- timm's npz reader (numpy)


def _timm_state_dict(w) -> dict:
    """What timm's `_load_weights` builds from a pre-Linen npz (checkpoints.md section 11), with the
    same key lookups, so a missing or misnamed key fails here as it would in timm."""
    sd = {
        "patch_embed.proj.weight": w["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": w["embedding/bias"],
        "cls_token": w["cls"],
        "pos_embed": w["Transformer/posembed_input/pos_embedding"],
        "norm.weight": w["Transformer/encoder_norm/scale"],
        "norm.bias": w["Transformer/encoder_norm/bias"],
        "head.weight": w["head/kernel"].T,
        "head.bias": w["head/bias"],
    }
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        b = f"Transformer/encoderblock_{i}/"
        m = b + "MultiHeadDotProductAttention_1/"
        sd[f"blocks.{i}.norm1.weight"] = w[b + "LayerNorm_0/scale"]
        sd[f"blocks.{i}.norm1.bias"] = w[b + "LayerNorm_0/bias"]
        sd[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
            [w[f"{m}{n}/kernel"].reshape(w[f"{m}{n}/kernel"].shape[0], -1).T for n in ("query", "key", "value")])
        sd[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(
            [w[f"{m}{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
        sd[f"blocks.{i}.attn.proj.weight"] = w[m + "out/kernel"].transpose(2, 0, 1).reshape(
            w[m + "out/kernel"].shape[-1], -1)
        sd[f"blocks.{i}.attn.proj.bias"] = w[m + "out/bias"]
        sd[f"blocks.{i}.norm2.weight"] = w[b + "LayerNorm_2/scale"]
        sd[f"blocks.{i}.norm2.bias"] = w[b + "LayerNorm_2/bias"]
        for r in range(2):
            sd[f"blocks.{i}.mlp.fc{r + 1}.weight"] = w[f"{b}MlpBlock_3/Dense_{r}/kernel"].T
            sd[f"blocks.{i}.mlp.fc{r + 1}.bias"] = w[f"{b}MlpBlock_3/Dense_{r}/bias"]
        i += 1
    return {k: np.asarray(v, np.float64) for k, v in sd.items()}


def _timm_forward(sd: dict, x: np.ndarray, num_heads: int) -> np.ndarray:
    """timm VisionTransformer eval forward (fused qkv, exact GELU, LN eps 1e-6), float64 numpy."""
    def ln(t, g, b):
        mu = t.mean(-1, keepdims=True)
        var = ((t - mu) ** 2).mean(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + 1e-6) * g + b

    wconv = sd["patch_embed.proj.weight"]  # (D, 3, P, P)
    d, _, p, _ = wconv.shape
    bsz, h, wd, c = x.shape
    gh, gw = h // p, wd // p
    patches = x[:, :gh * p, :gw * p].astype(np.float64).reshape(bsz, gh, p, gw, p, c)
    t = np.einsum("bhpwqc,dcpq->bhwd", patches, wconv).reshape(bsz, gh * gw, d) + sd["patch_embed.proj.bias"]
    t = np.concatenate([np.broadcast_to(sd["cls_token"], (bsz, 1, d)), t], axis=1) + sd["pos_embed"]
    hd = d // num_heads
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        s = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        y = ln(t, s("norm1.weight"), s("norm1.bias"))
        qkv = (y @ s("attn.qkv.weight").T + s("attn.qkv.bias")).reshape(bsz, -1, 3, num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        a = np.einsum("bqhd,bkhd->bhqk", q, k) * hd**-0.5
        a = np.exp(a - a.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(bsz, -1, d)
        t = t + o @ s("attn.proj.weight").T + s("attn.proj.bias")
        y = ln(t, s("norm2.weight"), s("norm2.bias"))
        y = y @ s("mlp.fc1.weight").T + s("mlp.fc1.bias")
        y = 0.5 * y * (1.0 + scipy.special.erf(y / np.sqrt(2.0)))
        t = t + y @ s("mlp.fc2.weight").T + s("mlp.fc2.bias")
        i += 1
    t = ln(t, sd["norm.weight"], sd["norm.bias"])
    return t[:, 0] @ sd["head.weight"].T + sd["head.bias"]


# ------------------------------------------------------------------------------------ save / load


def test_save_load_round_trip_is_identical(tmp_path, tiny_params):
    path = jax_peft.save_checkpoint(tmp_path / "sub" / "tiny.npz", tiny_params)
    assert path.exists() and not [p for p in path.parent.iterdir() if p != path]  # no temp file left
    _assert_same_tree(jax_peft.load_checkpoint(path), tiny_params)
    # and again: save(load(file)) writes the same arrays
    again = jax_peft.save_checkpoint(tmp_path / "again.npz", jax_peft.load_checkpoint(path))
    a, b = ckpt.read_npz(path), ckpt.read_npz(again)
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_saved_file_has_timm_layout_and_timm_logits(tmp_path, tiny_config, tiny_params, tiny_images):
    """The saved keys/shapes are exactly timm's npz layout (checkpoints.md sections 3 and 11), and
    reading the file the way timm does gives our logits."""
    c = tiny_config
    d, h, hd, m, p, n = c.hidden_size, c.num_heads, c.head_dim, c.mlp_dim, c.patch_size, c.grid_size**2
    expected = {"cls": (1, 1, d), "embedding/kernel": (p, p, 3, d), "embedding/bias": (d,),
                "Transformer/posembed_input/pos_embedding": (1, n + 1, d),
                "Transformer/encoder_norm/scale": (d,), "Transformer/encoder_norm/bias": (d,),
                "head/kernel": (d, c.num_classes), "head/bias": (c.num_classes,)}
    for i in range(c.num_layers):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            expected[b + ln + "/scale"] = expected[b + ln + "/bias"] = (d,)
        for qkv in ("query", "key", "value"):
            expected[f"{b}MultiHeadDotProductAttention_1/{qkv}/kernel"] = (d, h, hd)
            expected[f"{b}MultiHeadDotProductAttention_1/{qkv}/bias"] = (h, hd)
        expected[b + "MultiHeadDotProductAttention_1/out/kernel"] = (h, hd, d)
        expected[b + "MultiHeadDotProductAttention_1/out/bias"] = (d,)
        expected[b + "MlpBlock_3/Dense_0/kernel"], expected[b + "MlpBlock_3/Dense_0/bias"] = (d, m), (m,)
        expected[b + "MlpBlock_3/Dense_1/kernel"], expected[b + "MlpBlock_3/Dense_1/bias"] = (m, d), (d,)

    path = jax_peft.save_checkpoint(tmp_path / "tiny.npz", tiny_params)
    with np.load(path, allow_pickle=False) as w:
        assert {k: w[k].shape for k in w.files} == expected
        assert all(w[k].dtype == np.float32 for k in w.files)
        sd = _timm_state_dict(w)
    ours = _logits(tiny_params, tiny_images, tiny_config)
    theirs = _timm_forward(sd, tiny_images, c.num_heads)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_save_writes_original_names_of_the_formula_checkpoint(tmp_path, formula_flat, formula_npz):
    """Saving the canonical formula tree reproduces the original file key for key, bit for bit."""
    params = jax_peft.load_checkpoint(formula_npz)
    saved = ckpt.read_npz(jax_peft.save_checkpoint(tmp_path / "f.npz", params))
    assert sorted(saved) == sorted(formula_flat)
    assert all(np.array_equal(saved[k], formula_flat[k]) for k in saved)


def test_save_rejects_non_vit_trees(tmp_path, tiny_params):
    with pytest.raises(ValueError, match="merge"):
        jax_peft.save_checkpoint(tmp_path / "a.npz", {"adapter": {"u": np.zeros(3)}})
    with pytest.raises(ValueError, match=r"\.npz"):
        jax_peft.save_checkpoint(tmp_path / "a.bin", tiny_params)


# ------------------------------------------------------------------------------------------ layouts


@pytest.fixture
def zero_cls_row_params(tiny_params):
    """tiny params whose posemb CLS row is zero: then every layout stores exactly the same numbers."""
    tiny_params["Transformer"]["posembed_input"]["pos_embedding"][:, 0] = 0.0
    return tiny_params


@pytest.mark.parametrize("layout,writer", [
    ("pre-Linen", _pre_linen_flat),
    ("Linen", _flat),
    ("big_vision", _big_vision_flat),
    ("big_vision-scan", lambda t: _big_vision_flat(t, scan=True)),
    ("big_vision", lambda t: _big_vision_flat(t, prefix="params/img/")),
    ("pre-Linen", lambda t: {"opt/target/" + k: v for k, v in _pre_linen_flat(t).items()}),
])
def test_every_layout_loads_to_the_same_tree(tmp_path, zero_cls_row_params, layout, writer):
    flat = writer(zero_cls_row_params)
    assert ckpt.detect_layout(flat) == layout
    if "params/img/cls" in flat:  # a two-tower file: the text tower is ignored
        flat["params/txt/Embed_0/embedding"] = np.zeros((3, 2), np.float32)
    if "opt/target/cls" in flat:  # optimizer state outside the target is ignored
        flat["opt/state/step"] = np.zeros((), np.int32)
    path = _save_flat(tmp_path / "x.npz", flat)
    _assert_same_tree(jax_peft.load_checkpoint(path), zero_cls_row_params)
    # read lazily (memory maps, cast and block-sliced on read): the same values, nothing read up front
    lazy = jax_peft.load_checkpoint(path, lazy=True)
    assert all(isinstance(v, LazyArray) for k, v in paths.flatten(lazy).items() if not k.endswith("pos_embedding"))
    _assert_same_tree(lazy, zero_cls_row_params)


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_file_gives_the_same_logits(tmp_path, tiny_params, tiny_images, scan):
    """A general posemb (non-zero CLS row) moved into `cls` big_vision-style: same function."""
    pre = jax_peft.load_checkpoint(_save_flat(tmp_path / "pre.npz", _pre_linen_flat(tiny_params)))
    bv = jax_peft.load_checkpoint(_save_flat(tmp_path / "bv.npz", _big_vision_flat(tiny_params, scan=scan)))
    assert sorted(_flat(bv)) == sorted(_flat(pre))
    np.testing.assert_array_equal(bv["Transformer"]["posembed_input"]["pos_embedding"][:, 0], 0.0)
    np.testing.assert_allclose(_logits(bv, tiny_images), _logits(pre, tiny_images), rtol=1e-5, atol=1e-5)


def test_big_vision_gap_model_keeps_posemb_without_cls_slot(tmp_path, tiny_images):
    from conftest import random_params, tiny_vit_config

    cfg = tiny_vit_config(classifier="gap")
    params = random_params(cfg, 3)
    flat = {"params/" + k: v for k, v in _flat(params).items()}
    flat["params/pos_embedding"] = flat.pop("params/Transformer/posembed_input/pos_embedding")
    loaded = jax_peft.load_checkpoint(_save_flat(tmp_path / "gap.npz", flat))
    _assert_same_tree(loaded, params)
    assert jax_peft.vit_config(loaded).classifier == "gap"


def test_bfloat16_stored_as_void_is_decoded(tmp_path, tiny_params):
    flat = {k: v.astype(ml_dtypes.bfloat16).view("V2") for k, v in _pre_linen_flat(tiny_params).items()}
    path = _save_flat(tmp_path / "bf16.npz", flat)
    with np.load(path) as z:
        assert z["cls"].dtype == np.dtype("V2")
    loaded = jax_peft.load_checkpoint(path)
    rounded = jax_peft.load_checkpoint(_save_flat(
        tmp_path / "r.npz",
        {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in _pre_linen_flat(tiny_params).items()}))
    _assert_same_tree(loaded, rounded)
    assert ckpt.read_npz(path)["cls"].dtype == ml_dtypes.bfloat16


def test_hybrid_groupnorm_scales_are_squeezed():
    flat = {"embedding/kernel": np.zeros((1, 1, 3, 4), np.float32),
            "ResNet/root/GroupNorm_0/scale": np.ones((1, 1, 1, 8), np.float32)}
    tree = ckpt.normalize(flat)
    assert tree["ResNet"]["root"]["GroupNorm_0"]["scale"].shape == (8,)


def test_renumbering_rule_is_per_prefix_and_natural_sorted():
    keys = [f"Transformer/encoderblock_{i}/{s}/w" for i in (0, 2, 10) for s in
            ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")] + ["embedding/kernel"]
    tree = ckpt.normalize({k: np.zeros(1, np.float32) for k in keys})
    blocks = list(tree["Transformer"])
    assert blocks == ["encoderblock_0", "encoderblock_2", "encoderblock_10"]  # indices kept, natural order
    assert list(tree["Transformer"]["encoderblock_10"]) == [
        "LayerNorm_0", "LayerNorm_1", "MlpBlock_0", "MultiHeadDotProductAttention_0"]


# ------------------------------------------------------------------- fine-tuning load and helpers


def test_load_with_config_drops_pre_logits_resets_head_and_resizes(tmp_path, tiny_params, tiny_config):
    import jax

    d = tiny_config.hidden_size
    rng = np.random.default_rng(1)
    tiny_params["pre_logits"] = {"kernel": rng.standard_normal((d, d)).astype(np.float32),
                                 "bias": np.zeros(d, np.float32)}
    tiny_params["head"] = {"kernel": rng.standard_normal((d, 11)).astype(np.float32),
                           "bias": np.ones(11, np.float32)}
    path = jax_peft.save_checkpoint(tmp_path / "in21k_like.npz", tiny_params)

    raw = jax_peft.load_checkpoint(path)  # no config: stored tree as is
    assert "pre_logits" in raw and raw["head"]["kernel"].shape == (d, 11)
    assert jax_peft.vit_config(raw).representation_size == d

    cfg = tiny_config.replace(num_classes=7, image_size=48)
    params = jax_peft.load_checkpoint(path, config=cfg)
    assert "pre_logits" not in params
    np.testing.assert_array_equal(params["head"]["kernel"], np.zeros((d, 7)))
    np.testing.assert_array_equal(params["head"]["bias"], np.zeros(7))
    pe = params["Transformer"]["posembed_input"]["pos_embedding"]
    assert pe.shape == (1, 1 + 36, d)
    np.testing.assert_array_equal(pe[:, 0], tiny_params["Transformer"]["posembed_input"]["pos_embedding"][:, 0])
    jax_peft.validate_params(params, cfg)
    # the adapted tree fits the model at the new resolution (traced, not compiled: shapes are the point)
    out = jax.eval_shape(lambda p, x: jax_peft.ViT(cfg).apply({"params": p}, x, train=False), params,
                         jax.ShapeDtypeStruct((1, 48, 48, 3), np.float32))
    assert out.shape == (1, 7)

    kept = jax_peft.load_checkpoint(path, config=tiny_config.replace(num_classes=11))
    np.testing.assert_array_equal(kept["head"]["bias"], np.ones(11))  # matching head kept ("auto")
    reset = jax_peft.load_checkpoint(path, config=tiny_config.replace(num_classes=11), head="reset")
    np.testing.assert_array_equal(reset["head"]["bias"], np.zeros(11))


def test_reset_head_and_drop_pre_logits(tiny_params):
    import jax

    new = jax_peft.reset_head(tiny_params, 3, bias_init=-10.0)
    assert new["head"]["kernel"].shape == (32, 3) and not new["head"]["kernel"].any()
    np.testing.assert_array_equal(new["head"]["bias"], np.full(3, -10.0))
    assert tiny_params["head"]["kernel"].shape == (32, 5)  # input untouched
    rnd = jax_peft.reset_head(tiny_params, 3, init="torch_linear", rng=jax.random.PRNGKey(0))
    assert np.abs(rnd["head"]["kernel"]).max() <= 1 / np.sqrt(32) and rnd["head"]["kernel"].any()
    with pytest.raises(ValueError, match="rng"):
        jax_peft.reset_head(tiny_params, 3, init="trunc_normal")
    assert jax_peft.drop_pre_logits(tiny_params) == tiny_params  # no-op without pre_logits


# ---------------------------------------------------------------------------- posemb resize (rule)


def _zoom_reference(pe: np.ndarray, new: int, prefix: int = 1) -> np.ndarray:
    """vit_jax's own implementation of the rule: scipy.ndimage.zoom(order=1) on the grid."""
    g_old = int(np.sqrt(pe.shape[1] - prefix))
    grid = pe[0, prefix:].reshape(g_old, g_old, -1).astype(np.float64)
    zoomed = scipy.ndimage.zoom(grid, (new / g_old, new / g_old, 1), order=1)
    assert zoomed.shape[:2] == (new, new)
    return np.concatenate([pe[0, :prefix], zoomed.reshape(new * new, -1)])[None]


def _loop_reference(pe: np.ndarray, new: int, prefix: int = 1) -> np.ndarray:
    """The rule written out with loops over output indices (bilinear, corners aligned)."""
    g = int(np.sqrt(pe.shape[1] - prefix))
    grid = pe[0, prefix:].reshape(g, g, -1).astype(np.float64)
    out = np.zeros((new, new, grid.shape[-1]))
    for i in range(new):
        for j in range(new):
            y, x = i * (g - 1) / (new - 1), j * (g - 1) / (new - 1)
            y0, x0 = min(int(np.floor(y)), g - 1), min(int(np.floor(x)), g - 1)
            y1, x1 = min(y0 + 1, g - 1), min(x0 + 1, g - 1)
            wy, wx = y - y0, x - x0
            out[i, j] = ((1 - wy) * (1 - wx) * grid[y0, x0] + (1 - wy) * wx * grid[y0, x1]
                         + wy * (1 - wx) * grid[y1, x0] + wy * wx * grid[y1, x1])
    return np.concatenate([pe[0, :prefix], out.reshape(new * new, -1)])[None]


@pytest.mark.parametrize("old,new", [(14, 24), (24, 14), (2, 7), (7, 3)])
def test_resize_matches_independent_implementations(old, new):
    pe = np.random.default_rng(old * 100 + new).standard_normal((1, 1 + old * old, 6)).astype(np.float32)
    ours = jax_peft.resize_pos_embedding(pe, grid=new)
    assert ours.shape == (1, 1 + new * new, 6) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours[:, 0], pe[:, 0])  # CLS row kept
    np.testing.assert_allclose(ours, _zoom_reference(pe, new), atol=2e-6)
    np.testing.assert_allclose(ours, _loop_reference(pe, new), atol=2e-6)
    gap = jax_peft.resize_pos_embedding(pe[:, 1:], grid=new)  # no CLS slot: inferred from the row count
    np.testing.assert_allclose(gap, _zoom_reference(pe[:, 1:], new, prefix=0), atol=2e-6)


def test_resize_14_to_24_samples_corner_aligned_coordinates():
    ii, jj = np.meshgrid(np.arange(14.0), np.arange(14.0), indexing="ij")
    pe = np.concatenate([np.full((1, 2), 7.0), np.stack([ii, jj], -1).reshape(196, 2)])[None]
    out = jax_peft.resize_pos_embedding(pe, grid=24)[0, 1:].reshape(24, 24, 2)
    assert out[1, 0, 0] == pytest.approx(13 / 23) and out[1, 0, 0] == pytest.approx(0.5652, abs=1e-4)
    np.testing.assert_allclose(out[:, 0, 0], np.arange(24) * 13 / 23, atol=1e-12)
    np.testing.assert_allclose(out[0, :, 1], np.arange(24) * 13 / 23, atol=1e-12)
    assert out[23, 23, 0] == 13 and out[23, 23, 1] == 13  # corners aligned


def test_resize_tree_by_image_size(tiny_params):
    new = jax_peft.resize_pos_embedding(tiny_params, 64)  # patch 8: grid 4 -> 8
    pe = tiny_params["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_allclose(new["Transformer"]["posembed_input"]["pos_embedding"], _zoom_reference(pe, 8),
                               atol=2e-6)
    assert jax_peft.vit_config(new).image_size == 64
    same = jax_peft.resize_pos_embedding(tiny_params, 32)
    np.testing.assert_array_equal(same["Transformer"]["posembed_input"]["pos_embedding"], pe)
    with pytest.raises(ValueError, match="grid"):
        jax_peft.resize_pos_embedding(pe, 64)  # an array does not know its patch size


# ------------------------------------------------------------------------------------- bad inputs


def test_truncated_file(tmp_path, tiny_params):
    path = jax_peft.save_checkpoint(tmp_path / "t.npz", tiny_params)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"(?s)truncated.*download it again"):
        jax_peft.load_checkpoint(path)


def test_corrupted_member(tmp_path, tiny_params):
    path = jax_peft.save_checkpoint(tmp_path / "c.npz", tiny_params)
    data = bytearray(path.read_bytes())
    data[200:260] = b"\xff" * 60  # inside the first member's data: bad CRC when read
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"(?s)c\.npz.*(truncated|corrupted)"):
        jax_peft.load_checkpoint(path)


@pytest.mark.parametrize("content,kind", [(b"<!DOCTYPE html><html>Not Found</html>", "HTML"),
                                          (b"hello, this is text", "not a zip")])
def test_non_npz_file(tmp_path, content, kind):
    path = tmp_path / "x.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"(?s)not a \.npz checkpoint.*{kind}"):
        jax_peft.load_checkpoint(path)


def test_npz_without_vit_arrays(tmp_path):
    path = _save_flat(tmp_path / "other.npz", {"weights": np.zeros(3)})
    with pytest.raises(ValueError, match=r"(?s)not a ViT checkpoint.*embedding/kernel.*weights"):
        jax_peft.load_checkpoint(path)


def test_validation_lists_every_problem_in_one_error(tiny_config, tiny_params):
    jax_peft.validate_params(tiny_params, tiny_config)  # the good tree passes
    bad = paths.flatten(tiny_params)
    del bad["Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias"]
    del bad["cls"]
    bad["Transformer/encoderblock_0/LayerNorm_0/scale"] = np.ones(31, np.float32)
    bad["head/kernel"] = np.zeros((32, 9), np.float32)
    bad["pre_logits/kernel"] = np.zeros((32, 32), np.float32)
    with pytest.raises(ValueError) as err:
        jax_peft.validate_params(paths.unflatten(bad), tiny_config)
    msg = str(err.value)
    for text in ("missing (2)", "Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias (32,)", "cls (1, 1, 32)",
                 "unexpected (1)", "pre_logits/kernel (32, 32)", "wrong shape (2)",
                 "Transformer/encoderblock_0/LayerNorm_0/scale: got (31,), expected (32,)",
                 "head/kernel: got (32, 9), expected (32, 5)", "drop_pre_logits", "reset_head(params, 5)",
                 "vit_config(params)"):
        assert text in msg, (text, msg)


def test_wrong_shape_when_loading_against_a_config(tmp_path, tiny_params, tiny_config):
    path = jax_peft.save_checkpoint(tmp_path / "w.npz", tiny_params)
    with pytest.raises(ValueError, match=r"(?s)wrong shape.*MlpBlock_0/Dense_0/kernel: got \(32, 64\), "
                                         r"expected \(32, 128\).*vit_config\(params\)"):
        jax_peft.load_checkpoint(path, config=tiny_config.replace(mlp_dim=128))
    with pytest.raises(ValueError, match=r"(?s)missing \(16\).*encoderblock_2/"):
        jax_peft.load_checkpoint(path, config=tiny_config.replace(num_layers=3))


def test_unknown_model_name_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)unknown checkpoint name 'ViT-Q_99'.*ViT-B_16.*augreg"):
        jax_peft.load_checkpoint("ViT-Q_99", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*existing \.npz path"):
        jax_peft.load_checkpoint(tmp_path / "nope.npz")


def test_unreachable_url(tmp_path):
    url = "http://127.0.0.1:9/x.npz"  # discard port, closed: connection refused, no real network
    with pytest.raises(download.DownloadError, match=r"(?s)cannot download http://127\.0\.0\.1:9/x\.npz.*"
                                                     r"manually.*local path"):
        jax_peft.load_checkpoint(url, cache_dir=tmp_path, progress=False)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


# ------------------------------------------------------------------------------- names and cache


@pytest.mark.parametrize("name,url", [
    ("ViT-B_16", "vit_models/imagenet21k/ViT-B_16.npz"),
    ("ViT-B/16", "vit_models/imagenet21k/ViT-B_16.npz"),
    ("ViT-H_14", "vit_models/imagenet21k/ViT-H_14.npz"),
    ("imagenet21K/ViT-L_16", "vit_models/imagenet21k/ViT-L_16.npz"),
    ("imagenet21k+imagenet2012/ViT-B_16-224", "vit_models/imagenet21k+imagenet2012/ViT-B_16-224.npz"),
    ("augreg/B_16", "vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz"),
    ("augreg/ViT-Ti/16", "vit_models/augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz"),
    ("augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
     "vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03"
     "-res_384.npz"),
    ("gs://vit_models/sam/ViT-B_16.npz", "vit_models/sam/ViT-B_16.npz"),
])
def test_short_names_and_gs_urls(name, url):
    assert download.resolve(name) == ("url", "https://storage.googleapis.com/" + url)


class _Server:
    """A local HTTP server (127.0.0.1, random port) serving `files` {url path: bytes}; `lie` paths
    announce a longer Content-Length than they send (a truncated transfer)."""

    def __init__(self, files: dict[str, bytes], lie: set[str] = frozenset()):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                body = files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (1000 if self.path in lie else 0)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def test_download_cache(tmp_path, monkeypatch, tiny_params):
    body = jax_peft.save_checkpoint(tmp_path / "src.npz", tiny_params).read_bytes()
    cache = tmp_path / "cache"
    monkeypatch.setenv("JAX_PEFT_CACHE", str(cache))
    with _Server({"/models/tiny.npz": body}) as srv:
        url = srv.url + "/models/tiny.npz"
        params = jax_peft.load_checkpoint(url, progress=True)
        _assert_same_tree(params, tiny_params)
        cached = download.cache_path(url)
        assert cached.parent.parent.parent == cache and cached.read_bytes() == body
        record = json.loads(cached.with_name(cached.name + ".sha256.json").read_text())
        assert record["size"] == len(body) and record["sha256"] == download.sha256_file(cached)
        assert record["url"] == url
        assert sorted(p.name for p in cached.parent.iterdir()) == ["tiny.npz", "tiny.npz.sha256.json"]
        assert srv.requests == ["/models/tiny.npz"]

        # second load: served from the cache, no request
        _assert_same_tree(jax_peft.load_checkpoint(url), tiny_params)
        assert len(srv.requests) == 1
        # an explicit cache_dir wins over the environment variable
        assert download.cache_path(url, tmp_path / "other").is_relative_to(tmp_path / "other")

        # corruption of the cached copy (same size) is detected by the recorded SHA-256
        data = bytearray(body)
        data[-30] ^= 0xFF
        cached.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=r"(?s)corrupted.*SHA-256.*force_download=True"):
            jax_peft.load_checkpoint(url)
        cached.write_bytes(body[:-10])  # a size change is caught even without hashing
        with pytest.raises(ValueError, match=r"(?s)corrupted.*bytes.*force_download"):
            jax_peft.load_checkpoint(url, verify=False)
        _assert_same_tree(jax_peft.load_checkpoint(url, force_download=True, progress=False), tiny_params)
        assert len(srv.requests) == 2 and cached.read_bytes() == body


def test_download_failures_leave_nothing_behind(tmp_path, tiny_params):
    body = jax_peft.save_checkpoint(tmp_path / "src.npz", tiny_params).read_bytes()
    cache = tmp_path / "cache"
    files = {"/short.npz": body, "/page.npz": b"<html>sign in</html>", "/cut.npz": body[:-100]}
    with _Server(files, lie={"/short.npz"}) as srv:
        with pytest.raises(download.DownloadError, match=r"(?s)truncated: received \d+ of \d+ bytes.*manually"):
            jax_peft.load_checkpoint(srv.url + "/short.npz", cache_dir=cache, progress=False)
        with pytest.raises(download.DownloadError, match=r"(?s)HTML page.*manually"):
            jax_peft.load_checkpoint(srv.url + "/page.npz", cache_dir=cache, progress=False)
        with pytest.raises(download.DownloadError, match=r"(?s)truncated or corrupted.*manually"):
            jax_peft.load_checkpoint(srv.url + "/cut.npz", cache_dir=cache, progress=False)
        with pytest.raises(download.DownloadError, match=r"(?s)HTTP 404.*case-sensitive.*manually"):
            jax_peft.load_checkpoint(srv.url + "/missing.npz", cache_dir=cache, progress=False)
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_hand_copied_cache_file_gets_a_sidecar(tmp_path, tiny_params):
    url = "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz"
    dest = download.cache_path(url, tmp_path)
    dest.parent.mkdir(parents=True)
    jax_peft.save_checkpoint(dest, tiny_params)
    _assert_same_tree(jax_peft.load_checkpoint("ViT-B_16", cache_dir=tmp_path), tiny_params)  # no network
    assert dest.with_name(dest.name + ".sha256.json").exists()


# ----------------------------------------------------------------------------------- inspect script


def _inspect_module():
    spec = importlib.util.spec_from_file_location("inspect_checkpoint", ROOT / "scripts" / "inspect_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_inspect_script(tmp_path, capsys, tiny_params):
    mod = _inspect_module()
    path = _save_flat(tmp_path / "bv.npz", _big_vision_flat(tiny_params, scan=True))
    assert mod.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"params/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel +\(2, 32, 64\) +float32", out)
    for text in ("naming variant  big_vision-scan", "prefix          params/", "depth           2",
                 "heads           2 x 16", "patch           8", "mlp             64", "classes         5",
                 "image size      32 (4x4 patches)", "pre_logits      no", "block 1"):
        assert text in out, (text, out)
    counts = mod.group_counts(jax_peft.load_checkpoint(path))
    per_group = sum(v for k, v in counts.items() if k not in ("total", "backbone (no head, no pre_logits)"))
    assert per_group == counts["total"] == paths.count(tiny_params)
    assert counts["backbone (no head, no pre_logits)"] == counts["total"] - 32 * 5 - 5
    assert counts["block 0"] == 4 * 32 * 32 + 2 * 32 * 64 + 9 * 32 + 64


def test_inspect_detects_original_in21k_layout(tmp_path, capsys, tiny_params):
    mod = _inspect_module()
    tiny_params["pre_logits"] = {"kernel": np.eye(32, dtype=np.float32), "bias": np.zeros(32, np.float32)}
    tiny_params["head"] = {"kernel": np.zeros((32, 7), np.float32), "bias": np.zeros(7, np.float32)}
    path = jax_peft.save_checkpoint(tmp_path / "orig.npz", tiny_params)
    assert mod.main([str(path), "--max-rows", "5"]) == 0
    out = capsys.readouterr().out
    for text in ("naming variant  pre-Linen", "pre_logits      32", "head all zeros  True", "note: the head",
                 "pre_logits"):
        assert text in out, (text, out)
    assert re.search(r"\npre_logits +1,056\n", out)


def test_saved_file_has_normal_permissions(tmp_path, tiny_params):
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    path = jax_peft.save_checkpoint(tmp_path / "p.npz", tiny_params)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
