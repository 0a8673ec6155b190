"""timm ViT state dicts: conversion to and from the canonical tree, files (.safetensors, .pth) and
`hf-hub:` URLs, on state dicts the tests generate (no network: a local http.server stands in for
the Hub).

`timm_forward` is timm's `VisionTransformer.forward` written out in float64 numpy from its
published definition (PatchEmbed conv, [cls_token] + pos_embed, pre-norm blocks with fused qkv and
exact GELU, LayerNorm eps 1e-6, then `global_pool` "token" / "avg" (fc_norm=False) / "map"
(AttentionPoolLatent: latent query, kv Linear, proj, `x + mlp(norm(x))`), then `head`).
"""

from __future__ import annotations

import http.server
import threading

import numpy as np
import pytest
from scipy.special import erf

import jax_peft
from jax_peft import download, paths, timm_vit
from jax_peft.torch_io import save_pth, save_safetensors

D, H, M, P, IMG, C, DEPTH = 32, 2, 64, 8, 32, 5, 2


def _ln(x, sd, name):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-6) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def _lin(x, sd, name):
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def _attend(q, k, v):
    """(B, Tq, D), (B, Tk, D) x2 -> (B, Tq, D) with H heads of D // H channels."""
    b, tq, d = q.shape
    q, k, v = (t.reshape(b, -1, H, d // H).transpose(0, 2, 1, 3) for t in (q, k, v))
    a = q @ k.transpose(0, 1, 3, 2) * (d // H) ** -0.5
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return (a @ v).transpose(0, 2, 1, 3).reshape(b, tq, d)


def _mlp(x, sd, name):
    h = _lin(x, sd, f"{name}.fc1")
    return _lin(0.5 * h * (1 + erf(h / np.sqrt(2))), sd, f"{name}.fc2")


def timm_forward(sd: dict, images_nhwc: np.ndarray) -> np.ndarray:
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = images_nhwc.astype(np.float64).transpose(0, 3, 1, 2)  # NCHW, as torch
    b, c, hh, _ = x.shape
    g = hh // P
    patches = x.reshape(b, c, g, P, g, P).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * P * P)
    x = patches @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
    if "cls_token" in sd:
        if sd["pos_embed"].shape[1] == g * g:  # no_embed_class: add, then concat
            x = np.concatenate([np.tile(sd["cls_token"], (b, 1, 1)), x + sd["pos_embed"]], axis=1)
        else:
            x = np.concatenate([np.tile(sd["cls_token"], (b, 1, 1)), x], axis=1) + sd["pos_embed"]
    else:
        x = x + sd["pos_embed"]
    for i in range(DEPTH):
        y = _ln(x, sd, f"blocks.{i}.norm1")
        q, k, v = np.split(_lin(y, sd, f"blocks.{i}.attn.qkv"), 3, axis=-1)
        x = x + _lin(_attend(q, k, v), sd, f"blocks.{i}.attn.proj")
        x = x + _mlp(_ln(x, sd, f"blocks.{i}.norm2"), sd, f"blocks.{i}.mlp")
    x = _ln(x, sd, "norm")
    if "attn_pool.latent" in sd:
        q = _lin(np.tile(sd["attn_pool.latent"], (b, 1, 1)), sd, "attn_pool.q")
        k, v = np.split(_lin(x, sd, "attn_pool.kv"), 2, axis=-1)
        y = _lin(_attend(q, k, v), sd, "attn_pool.proj")
        x = (y + _mlp(_ln(y, sd, "attn_pool.norm"), sd, "attn_pool.mlp"))[:, 0]
    elif "cls_token" in sd:
        x = x[:, 0]
    else:
        x = x.mean(1)
    return _lin(x, sd, "head")


def timm_state_dict(pool: str = "token", seed: int = 0, no_embed_class: bool = False,
                    qkv_bias: bool = True) -> dict[str, np.ndarray]:
    """A random timm ViT state dict (torch layout, float32) for the tiny shape above."""
    rng = np.random.default_rng(seed)

    def r(*shape, scale=None):
        s = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (s * rng.standard_normal(shape)).astype(np.float32)

    def ln(name):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + r(D, scale=0.1), r(D, scale=0.1)

    def lin(name, n_out, n_in, bias=True):
        sd[f"{name}.weight"] = r(n_out, n_in)
        if bias:
            sd[f"{name}.bias"] = r(n_out, scale=0.1)

    n = (IMG // P) ** 2
    sd: dict[str, np.ndarray] = {"patch_embed.proj.weight": r(D, 3, P, P, scale=0.1),
                                 "patch_embed.proj.bias": r(D, scale=0.1)}
    if pool == "token":
        sd["cls_token"] = r(1, 1, D, scale=0.5)
    sd["pos_embed"] = r(1, n + (pool == "token" and not no_embed_class), D, scale=0.5)
    for i in range(DEPTH):
        ln(f"blocks.{i}.norm1")
        lin(f"blocks.{i}.attn.qkv", 3 * D, D, qkv_bias)
        lin(f"blocks.{i}.attn.proj", D, D)
        ln(f"blocks.{i}.norm2")
        lin(f"blocks.{i}.mlp.fc1", M, D)
        lin(f"blocks.{i}.mlp.fc2", D, M)
    ln("norm")
    if pool == "map":
        sd["attn_pool.latent"] = r(1, 1, D, scale=0.5)
        lin("attn_pool.q", D, D)
        lin("attn_pool.kv", 2 * D, D)
        lin("attn_pool.proj", D, D)
        ln("attn_pool.norm")
        lin("attn_pool.mlp.fc1", M, D)
        lin("attn_pool.mlp.fc2", D, M)
    lin("head", C, D)
    return sd


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(-1, 1, (2, IMG, IMG, 3)).astype(np.float32)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("pool,kw", [("token", {}), ("map", {}), ("avg", {}),
                                     ("token", {"no_embed_class": True, "qkv_bias": False})])
def test_timm_state_dict_gives_timm_logits_and_round_trips(tmp_path, images, pool, kw):
    sd = timm_state_dict(pool, **kw)
    path = tmp_path / "model.safetensors"
    save_safetensors(path, sd)
    params = jax_peft.load_checkpoint(path, num_heads=H)  # not stored; standard widths need no hint
    cfg = jax_peft.vit_config(params)
    assert cfg.classifier == {"avg": "gap"}.get(pool, pool) and (cfg.num_heads, cfg.num_classes) == (H, C)
    logits = jax_peft.ViT(cfg).apply({"params": params}, images)
    assert _rel(logits, timm_forward(sd, images)) < 1e-5
    back = timm_vit.to_timm(params)
    if not kw:  # exact inverse
        assert sorted(back) == sorted(sd)
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    else:  # zero qkv biases and a zero CLS position row are written out: same function in timm
        assert _rel(timm_forward(back, images), timm_forward(sd, images)) < 1e-12


def test_save_checkpoint_writes_timm_safetensors_and_pth_reads_too(tmp_path, images):
    sd = timm_state_dict("token", seed=2)
    save_pth(tmp_path / "model.pth", {"model": {f"module.{k}": v for k, v in sd.items()}})
    params = jax_peft.load_checkpoint(tmp_path / "model.pth", config=jax_peft.vit_config(
        None, patch_size=P, hidden_size=D, num_layers=DEPTH, num_heads=H, mlp_dim=M, num_classes=C, image_size=IMG))
    out = jax_peft.save_checkpoint(tmp_path / "merged.safetensors", params)
    from jax_peft.torch_io import read_state_dict

    written = read_state_dict(out)
    assert sorted(written) == sorted(sd)
    assert all(np.array_equal(written[k], sd[k]) for k in sd)


def test_unsupported_timm_variants_are_refused_by_name():
    sd = timm_state_dict("token")
    assert timm_vit.default_heads(768) == 12 and timm_vit.default_heads(1152) == 16
    with pytest.raises(ValueError, match=r"reg_token \(register tokens"):
        timm_vit.from_timm({**sd, "reg_token": np.zeros((1, 4, D), np.float32)})
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma \(LayerScale"):
        timm_vit.from_timm({**sd, "blocks.0.ls1.gamma": np.ones(D, np.float32)})
    gap = {k: v for k, v in timm_state_dict("avg").items() if not k.startswith("norm.")}
    with pytest.raises(ValueError, match="fc_norm.weight .*after average pooling"):
        timm_vit.from_timm({**gap, "fc_norm.weight": np.ones(D, np.float32), "fc_norm.bias": np.zeros(D, np.float32)})
    with pytest.raises(ValueError, match=r"no place .*'blocks\.0\.attn\.extra\.weight'"):
        timm_vit.from_timm({**sd, "blocks.0.attn.extra.weight": np.ones(3, np.float32)}, num_heads=H)
    with pytest.raises(ValueError, match="pass num_heads="):
        timm_vit.from_timm({**sd, "patch_embed.proj.weight": np.zeros((40, 3, P, P), np.float32)})
    swin = {"patch_embed.proj.weight": sd["patch_embed.proj.weight"], "layers.0.blocks.0.attn.qkv.weight": np.ones(3)}
    assert not timm_vit.is_timm_state_dict(swin)
    with pytest.raises(ValueError, match="not a timm ViT state dict"):
        timm_vit.from_timm(swin)
    params = timm_vit.from_timm(sd, num_heads=H)
    with pytest.raises(ValueError, match="drop_pre_logits"):
        timm_vit.to_timm({**params, "pre_logits": {"kernel": np.zeros((D, D)), "bias": np.zeros(D)}})
    with pytest.raises(ValueError, match="Merge adapters"):
        timm_vit.to_timm({**params, "lora": {"a": np.zeros(2)}})


def test_hf_hub_name_downloads_model_safetensors_into_the_cache(tmp_path, monkeypatch, images):
    """`hf-hub:timm/<name>` -> <hub>/timm/<name>/resolve/main/model.safetensors, cached and checked."""
    sd = timm_state_dict("token", seed=4)
    served = tmp_path / "served.safetensors"
    save_safetensors(served, sd)
    body = served.read_bytes()
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            ok = self.path == "/timm/vit_tiny_test.augreg_in21k/resolve/main/model.safetensors"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", str(len(body) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(download, "HF_HUB", f"http://127.0.0.1:{httpd.server_address[1]}/")
        name = "hf-hub:timm/vit_tiny_test.augreg_in21k"
        params = jax_peft.load_checkpoint(name, cache_dir=tmp_path / "cache", progress=False, num_heads=H)
        again = jax_peft.load_checkpoint(name, cache_dir=tmp_path / "cache", progress=False, num_heads=H)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert len(hits) == 1, "the second load reads the cache"
    cached = list((tmp_path / "cache").rglob("model.safetensors"))
    assert len(cached) == 1 and cached[0].read_bytes() == body
    for k, v in paths.flatten(params).items():
        np.testing.assert_array_equal(paths.flatten(again)[k], v)
    np.testing.assert_allclose(jax_peft.ViT(jax_peft.vit_config(params)).apply({"params": params}, images),
                               timm_forward(sd, images), rtol=1e-5, atol=1e-5)
    # a truncated cached file is detected
    cached[0].write_bytes(body[:-7])
    with pytest.raises(ValueError, match="corrupted"):
        jax_peft.load_checkpoint(name, cache_dir=tmp_path / "cache", progress=False, num_heads=H)
    with pytest.raises(ValueError, match="hf-hub:<org>/<repo>"):
        download.resolve("hf-hub:vit_base")


def test_safetensors_check_rejects_truncation_and_html(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"a": np.ones((4, 4), np.float32)})
    download.check_file(path)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        download.check_file(path)
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="HTML"):
        download.check_file(path)
