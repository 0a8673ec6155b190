"""big_vision MAP pooling (pool_type="map") and SigLIP image towers, on files the tests write.

The reference below is big_vision's ViT forward written out in float64 numpy from its published
definition (models/vit.py: learned posemb added before the optional CLS token, pre-norm blocks,
Flax MultiHeadDotProductAttention, tanh GELU, LayerNorm eps 1e-6; `MAPHead`: a probe (1, 1, D)
queries the tokens, then `y + MlpBlock(LayerNorm(y))`, row 0), read from the stored flat keys.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from conftest import random_params, tiny_vit_config

import jax_peft
from jax_peft import paths


def _ln(x, p, name):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-6) * p[f"{name}/scale"] + p[f"{name}/bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _mha(p, name, xq, xkv):
    """Flax MultiHeadDotProductAttention: DenseGeneral q/k/v (D, H, hd), q / sqrt(hd), softmax, out."""
    q, k, v = (np.einsum("btd,dhk->bthk", x, p[f"{name}/{w}/kernel"]) + p[f"{name}/{w}/bias"]
               for w, x in (("query", xq), ("key", xkv), ("value", xkv)))
    logits = np.einsum("bqhk,bshk->bhqs", q / np.sqrt(q.shape[-1]), k)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhqs,bshk->bqhk", w, v)
    return np.einsum("bqhk,hkd->bqd", o, p[f"{name}/out/kernel"]) + p[f"{name}/out/bias"]


def _mlp(p, name, x):
    h = _gelu_tanh(x @ p[f"{name}/Dense_0/kernel"] + p[f"{name}/Dense_0/bias"])
    return h @ p[f"{name}/Dense_1/kernel"] + p[f"{name}/Dense_1/bias"]


def big_vision_forward(flat: dict, images: np.ndarray, prefix: str = "params/") -> tuple[np.ndarray, np.ndarray]:
    """(logits or None, head_input) of big_vision's ViT for stored arrays `flat` (Linen names)."""
    p = {k[len(prefix):]: np.asarray(v, np.float64) for k, v in flat.items() if k.startswith(prefix)}
    kern = p["embedding/kernel"]
    patch, d = kern.shape[0], kern.shape[-1]
    b, hh, _, c = images.shape
    g = hh // patch
    x = images.astype(np.float64).reshape(b, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, g * g, -1) @ kern.reshape(-1, d) + p["embedding/bias"]
    x = x + p["pos_embedding"]
    if "cls" in p:
        x = np.concatenate([np.tile(p["cls"], (b, 1, 1)), x], axis=1)
    depth = len({k.split("/")[1] for k in p if k.startswith("Transformer/encoderblock_")})
    for i in range(depth):
        blk = f"Transformer/encoderblock_{i}"
        y = _ln(x, p, f"{blk}/LayerNorm_0")
        x = x + _mha(p, f"{blk}/MultiHeadDotProductAttention_0", y, y)
        x = x + _mlp(p, f"{blk}/MlpBlock_0", _ln(x, p, f"{blk}/LayerNorm_1"))
    x = _ln(x, p, "Transformer/encoder_norm")
    probe = np.tile(p["MAPHead_0/probe"], (b, 1, 1))
    y = _mha(p, "MAPHead_0/MultiHeadDotProductAttention_0", probe, x)
    y = y + _mlp(p, "MAPHead_0/MlpBlock_0", _ln(y, p, "MAPHead_0/LayerNorm_0"))
    feats = y[:, 0]
    logits = feats @ p["head/kernel"] + p["head/bias"] if "head/kernel" in p else None
    return logits, feats


@pytest.fixture(scope="module")
def map_config():
    return tiny_vit_config(classifier="map", gelu="tanh")


@pytest.fixture(scope="module")
def map_params(map_config):
    return random_params(map_config, 3)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def test_map_tree_layout_and_config(map_config, map_params):
    flat = paths.flatten(map_params)
    assert "cls" not in map_params and map_params["MAPHead_0"]["probe"].shape == (1, 1, 32)
    head = {k[len("MAPHead_0/"):] for k in flat if k.startswith("MAPHead_0/")}
    block = {k.split("/", 2)[2] for k in flat if k.startswith("Transformer/encoderblock_0/")}
    assert head == {"probe"} | {k for k in block if not k.startswith("LayerNorm_1/")}  # big_vision's names
    assert flat["MAPHead_0/MlpBlock_0/Dense_0/kernel"].shape == (32, 64)
    cfg = jax_peft.vit_config(map_params)
    assert cfg.classifier == "map" and cfg.grid_size**2 == 16  # 16 patch tokens, no class token
    with pytest.raises(ValueError, match="both a class token"):
        jax_peft.vit_config({**map_params, "cls": np.zeros((1, 1, 32), np.float32)})


def test_map_model_saved_in_big_vision_layout_matches_reference(tmp_path, map_config, map_params, tiny_images):
    path = jax_peft.save_checkpoint(tmp_path / "map.npz", map_params, layout="big_vision")
    with np.load(path) as z:
        stored = {k: z[k] for k in z.files}
    assert "params/pos_embedding" in stored and "params/MAPHead_0/probe" in stored
    assert jax_peft.detect_layout(stored) == "big_vision"
    ref_logits, ref_feats = big_vision_forward(stored, tiny_images)
    loaded = jax_peft.load_checkpoint(path)
    cfg = jax_peft.vit_config(loaded, gelu="tanh")
    assert cfg == map_config.replace(name=cfg.name)
    logits, feats = jax_peft.ViT(cfg).apply({"params": loaded}, tiny_images, return_features=True)
    assert _rel(logits, ref_logits) < 1e-5 and _rel(feats, ref_feats) < 1e-5


def test_token_model_round_trips_through_big_vision_layout(tmp_path, tiny_config, tiny_params, tiny_images):
    path = jax_peft.save_checkpoint(tmp_path / "tok.npz", tiny_params, layout="big_vision")
    loaded = jax_peft.load_checkpoint(path)
    model = jax_peft.ViT(tiny_config)
    a = model.apply({"params": tiny_params}, tiny_images)
    b = model.apply({"params": loaded}, tiny_images)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_siglip_shaped_two_tower_file_loads_the_image_tower(tmp_path, map_config, map_params, tiny_images):
    img = {k: v for k, v in paths.flatten(map_params).items() if not k.startswith("head/")}
    flat = {f"params/img/{k}": v for k, v in img.items()}
    flat["params/img/pos_embedding"] = flat.pop("params/img/Transformer/posembed_input/pos_embedding")
    flat.update({"params/txt/Embed_0/embedding": np.ones((7, 32), np.float32),
                 "params/txt/head/kernel": np.ones((32, 32), np.float32),
                 "params/t": np.ones((1,), np.float32), "params/b": np.ones((1,), np.float32)})
    np.savez(tmp_path / "siglip.npz", **flat)
    with pytest.warns(UserWarning, match=r"dropped 4 arrays under params/\{b, t, txt\}"):
        tower = jax_peft.load_checkpoint(tmp_path / "siglip.npz")
    assert "head" not in tower and "MAPHead_0" in tower
    cfg = jax_peft.vit_config(tower, gelu="tanh")
    assert cfg.classifier == "map"
    _, ref_feats = big_vision_forward(flat, tiny_images, prefix="params/img/")
    probe = jax_peft.reset_head(tower, 3)  # a zero head for a 3-class linear probe
    _, feats = jax_peft.ViT(cfg.replace(num_classes=3)).apply({"params": probe}, tiny_images, return_features=True)
    assert _rel(feats, ref_feats) < 1e-5
    # load_checkpoint(config=...) gives the fine-tuning tree directly (fresh zero head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ft = jax_peft.load_checkpoint(tmp_path / "siglip.npz", config=cfg.replace(num_classes=3))
    assert ft["head"]["kernel"].shape == (32, 3)


def test_inlined_map_head_of_early_big_vision_files(tmp_path, map_params):
    flat = {k.replace("MAPHead_0/", ""): v for k, v in paths.flatten(map_params).items()}
    flat["pos_embedding"] = flat.pop("Transformer/posembed_input/pos_embedding")
    np.savez(tmp_path / "inlined.npz", **flat)
    tree = jax_peft.load_checkpoint(tmp_path / "inlined.npz")
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, tree, map_params))


def test_every_method_works_on_a_map_model(map_config, map_params, tiny_images):
    """MAP sites are off by default: only full fine-tuning touches the MAP head. (Traced with
    eval_shape: shapes and paths without compiling nine methods.)"""
    for name in jax_peft.method_names():
        if name.endswith("_swin"):  # the Swin variants need a Swin tree
            continue
        method = jax_peft.get_method(name)
        adapter = jax.eval_shape(lambda m=method: m.init(jax.random.PRNGKey(0), map_params))
        in_head = [p for p in paths.flatten(adapter) if p.startswith("MAPHead_0/")]
        assert bool(in_head) == (name == "full"), name
        merged = jax.eval_shape(lambda m=method: m.apply(map_params, m.init(jax.random.PRNGKey(0), map_params)))
        assert sorted(paths.flatten(merged)) == sorted(paths.flatten(map_params)), name
    lora = jax_peft.get_method("lora")
    adapter = jax.tree_util.tree_map(lambda x: x + 0.1, lora.init(jax.random.PRNGKey(0), map_params))
    model = jax_peft.ViT(map_config)
    logits = model.apply({"params": lora.apply(map_params, adapter)}, tiny_images)
    assert _rel(logits, np.asarray(model.apply({"params": map_params}, tiny_images), np.float64)) > 1e-3


def test_siglip_short_names_resolve():
    from jax_peft import download

    url = "https://storage.googleapis.com/big_vision/siglip/webli_en_so400m_224_57633886.npz"
    for name in ("SigLIP So400m/14 224", "siglip/So400m_14-224", "siglip-so400m-14-224"):
        assert download.resolve(name) == ("url", url)
    assert download.resolve("SigLIP B/16 512")[1].endswith("webli_en_b16_512_68580893.npz")
    with pytest.raises(ValueError, match="SigLIP L/16 256"):
        download.resolve("SigLIP L/16 224")
    assert jax_peft.vit_config("So400m/14").hidden_size == 1152
