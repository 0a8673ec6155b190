"""timm `VisionTransformer` state dicts <-> the canonical Google tree (exact re-layouts, both ways).

    params = from_timm(read_state_dict("model.safetensors"))      # or load("hf-hub:timm/<name>")
    sd = to_timm(params)                                           # {"blocks.0.attn.qkv.weight": ...}
    save("merged.safetensors", params)                             # timm's load_state_dict reads it

timm layout (PyTorch: Linear weight (out, in), conv weight OIHW) -> canonical (jax_peft.vit):

    patch_embed.proj.weight (D, 3, P, P)      embedding/kernel (P, P, 3, D)
    cls_token (1, 1, D)                       cls (classifier "token")
    pos_embed (1, [1 +] N, D)                 Transformer/posembed_input/pos_embedding (a zero CLS
                                              row is added for no_embed_class files: same function)
    blocks.i.norm1 / norm2                    encoderblock_i/LayerNorm_0 / LayerNorm_1
    blocks.i.attn.qkv.weight (3D, D)          .../{query,key,value}/kernel (D, H, hd): rows [q; k; v]
    blocks.i.attn.qkv.bias (3D,)              .../{query,key,value}/bias (H, hd) (zeros if absent)
    blocks.i.attn.proj.weight (D, D)          .../out/kernel (H, hd, D)
    blocks.i.mlp.fc1 / fc2                    encoderblock_i/MlpBlock_0/Dense_0 / Dense_1 (transposed)
    norm                                      Transformer/encoder_norm
    attn_pool.{latent, q, kv, proj, norm, mlp.fc1, mlp.fc2}    MAPHead_0/{probe, query, key | value,
                                              out, LayerNorm_0, MlpBlock_0/Dense_0, Dense_1} ("map")
    head.weight (C, D), head.bias             head/kernel (D, C), head/bias

Pooling follows the keys: `cls_token` -> "token" (timm global_pool="token"); `attn_pool.*` -> "map"
(global_pool="map", class_token=False, as timm's SigLIP towers); neither -> "gap" (timm
class_token=False, global_pool="avg", fc_norm=False: the final norm before the mean). Refused,
naming the key: register tokens, LayerScale, qk-norm, CLIP's pre-norm, fc_norm (LayerNorm after
average pooling), distillation tokens and any other key jax_peft's ViT has no place for.

The head count is not stored in a state dict: it comes from `num_heads`, else from the width as in
every standard ViT (64-wide heads; 16 heads from width 1024 up, e.g. H/14 and SigLIP So400m/14).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jax_peft import paths

Tree = Mapping[str, Any]
TIMM_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# width -> heads of the standard ViT sizes (Ti, S, M, B, L, So400m, H, g, G)
HEADS_BY_WIDTH = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1152: 16, 1280: 16, 1408: 16, 1536: 16, 1664: 16}
_REFUSED = {  # key pattern -> what it is
    r"^reg_token$": "register tokens (timm reg_tokens > 0)",
    r"\.ls[12]\.gamma$": "LayerScale (timm init_values)",
    r"\.(q|k)_norm\.": "qk-norm (timm qk_norm=True)",
    r"^norm_pre\.": "a pre-norm before the blocks (CLIP-style, timm pre_norm=True)",
    r"^fc_norm\.": "a LayerNorm after average pooling (timm global_pool='avg' with fc_norm; jax_peft's "
                   "'gap' normalizes the tokens before the mean, i.e. timm fc_norm=False)",
    r"^dist_token$|^head_dist\.": "a distillation token (DeiT distilled)",
    r"^attn_pool\.pos_embed$": "a position embedding inside the attention pool",
}


class TimmLayoutError(ValueError):
    """A state dict that is not a timm ViT that jax_peft's ViT can express exactly."""


def is_timm_state_dict(keys: Any) -> bool:
    """A timm VisionTransformer's keys: a patch embedding and top-level `blocks.<i>.` (a Swin's blocks
    live under `layers.<i>.`)."""
    keys = set(keys)
    return "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys)


def default_heads(width: int) -> int:
    if width not in HEADS_BY_WIDTH:
        raise TimmLayoutError(f"a timm state dict does not store the number of attention heads and width "
                              f"{width} is not a standard ViT width ({sorted(HEADS_BY_WIDTH)}); pass num_heads=")
    return HEADS_BY_WIDTH[width]


def _f32(x: Any) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype != np.float32 else x


def from_timm(state_dict: Mapping[str, Any], *, num_heads: int | None = None) -> dict:
    """A timm ViT state dict (flat {name: array}, PyTorch layout) -> the canonical tree (float32).

    Every key must find its place; unsupported parts raise TimmLayoutError naming them."""
    sd = {k: _f32(v) for k, v in state_dict.items()}
    if not is_timm_state_dict(sd):
        raise TimmLayoutError(f"not a timm ViT state dict (no 'patch_embed.proj.weight' and 'blocks.<i>.*'); "
                              f"keys look like {list(sd)[:5]}")
    refused = [f"{k} ({what})" for k in sd for pat, what in _REFUSED.items() if re.search(pat, k)]
    if refused:
        raise TimmLayoutError("this timm ViT has parts jax_peft's ViT does not implement: " + "; ".join(refused)
                              + ". Use a plain ViT checkpoint (class token, MAP or average pooling).")
    used: set[str] = set()

    def take(key: str, default: np.ndarray | None = None) -> np.ndarray:
        if key not in sd:
            if default is not None:
                return default
            raise TimmLayoutError(f"timm state dict has no {key!r}: it is not a complete ViT")
        used.add(key)
        return sd[key]

    w = take("patch_embed.proj.weight")
    d, _, ph, pw = w.shape
    if ph != pw:
        raise TimmLayoutError(f"patch {ph}x{pw} is not square; jax_peft's ViT uses square patches")
    heads = num_heads or default_heads(d)
    if d % heads:
        raise TimmLayoutError(f"width {d} is not divisible by num_heads={heads}")
    hd = d // heads
    out: dict[str, np.ndarray] = {
        "embedding/kernel": w.transpose(2, 3, 1, 0),
        "embedding/bias": take("patch_embed.proj.bias", np.zeros(d, np.float32)),
    }
    zeros = np.zeros(d, np.float32)

    def linear(prefix: str, dst: str, kind: str = "dense") -> None:
        """timm Linear `prefix` -> canonical kernel/bias at `dst` (kind "heads_in": the attention
        output kernel (H*hd, D) -> (H, hd, D))."""
        wt = take(f"{prefix}.weight")
        b = take(f"{prefix}.bias", np.zeros(wt.shape[0], np.float32))
        k = wt.T
        if kind == "heads_in":
            k = k.reshape(heads, hd, k.shape[-1])
        out[f"{dst}/kernel"], out[f"{dst}/bias"] = k, b

    def split(prefix: str, dst: str, names: tuple[str, ...]) -> None:
        """A fused timm Linear (n·D, D) -> n head-major kernels (D, H, hd)."""
        wt = take(f"{prefix}.weight")
        b = take(f"{prefix}.bias", np.zeros(wt.shape[0], np.float32))
        if wt.shape != (len(names) * d, d):
            raise TimmLayoutError(f"{prefix}.weight has shape {wt.shape}, expected {(len(names) * d, d)}")
        for j, name in enumerate(names):
            out[f"{dst}/{name}/kernel"] = wt[j * d:(j + 1) * d].T.reshape(d, heads, hd)
            out[f"{dst}/{name}/bias"] = b[j * d:(j + 1) * d].reshape(heads, hd)

    def layer_norm(prefix: str, dst: str) -> None:
        out[f"{dst}/scale"] = take(f"{prefix}.weight")
        out[f"{dst}/bias"] = take(f"{prefix}.bias", zeros)

    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    for i in range(depth):
        src, dst = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        layer_norm(f"{src}.norm1", f"{dst}/LayerNorm_0")
        split(f"{src}.attn.qkv", f"{dst}/MultiHeadDotProductAttention_0", ("query", "key", "value"))
        linear(f"{src}.attn.proj", f"{dst}/MultiHeadDotProductAttention_0/out", "heads_in")
        layer_norm(f"{src}.norm2", f"{dst}/LayerNorm_1")
        linear(f"{src}.mlp.fc1", f"{dst}/MlpBlock_0/Dense_0")
        linear(f"{src}.mlp.fc2", f"{dst}/MlpBlock_0/Dense_1")
    layer_norm("norm", "Transformer/encoder_norm")

    pe = take("pos_embed")
    rows = pe.shape[1]
    if "cls_token" in sd:
        out["cls"] = take("cls_token")
        if int(round(rows**0.5)) ** 2 == rows:  # no_embed_class: the CLS token gets no position row
            pe = np.concatenate([np.zeros((1, 1, d), np.float32), pe], axis=1)
    out["Transformer/posembed_input/pos_embedding"] = pe
    if any(k.startswith("attn_pool.") for k in sd):
        if "cls_token" in sd:
            raise TimmLayoutError("a timm ViT with both a class token and attention pooling is not supported")
        latent = take("attn_pool.latent")
        if latent.shape != (1, 1, d):
            raise TimmLayoutError(f"attn_pool.latent has shape {latent.shape}; only one latent (1, 1, {d}) "
                                  "(big_vision's MAP head) is supported")
        out["MAPHead_0/probe"] = latent
        split("attn_pool.q", "MAPHead_0/MultiHeadDotProductAttention_0", ("query",))
        split("attn_pool.kv", "MAPHead_0/MultiHeadDotProductAttention_0", ("key", "value"))
        linear("attn_pool.proj", "MAPHead_0/MultiHeadDotProductAttention_0/out", "heads_in")
        layer_norm("attn_pool.norm", "MAPHead_0/LayerNorm_0")
        linear("attn_pool.mlp.fc1", "MAPHead_0/MlpBlock_0/Dense_0")
        linear("attn_pool.mlp.fc2", "MAPHead_0/MlpBlock_0/Dense_1")
        widths = {out["MAPHead_0/MlpBlock_0/Dense_0/kernel"].shape[1]} | (
            {out["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]} if depth else set())
        if len(widths) > 1:
            raise TimmLayoutError(f"the attention pool's MLP width differs from the blocks' ({sorted(widths)}); "
                                  "jax_peft's MAP head uses the blocks' mlp_dim, as big_vision")
    if "head.weight" in sd:
        linear("head", "head")
    unused = sorted(set(sd) - used)
    if unused:
        raise TimmLayoutError(f"timm state dict keys with no place in jax_peft's ViT: {unused[:8]}"
                              f"{' ...' if len(unused) > 8 else ''}. Only plain timm VisionTransformer "
                              "weights convert exactly.")
    return paths.unflatten(out)


def to_timm(params: Tree) -> dict[str, np.ndarray]:
    """The canonical tree -> a timm ViT state dict (float32, PyTorch layout; inverse of `from_timm`).

    timm model to load it into: `class_token=True, global_pool="token"` (the default) for
    classifier "token"; `class_token=False, global_pool="map"` for "map"; `class_token=False,
    global_pool="avg", fc_norm=False` for "gap"; `num_classes=0` when the tree has no head."""
    flat = {k: _f32(v) for k, v in paths.flatten(params).items()}
    if "Transformer/encoderblock/LayerNorm_0/scale" in flat:
        raise ValueError("to_timm takes a per-block tree; unstack a scanned tree with "
                         "jax_peft.unstack_blocks(params) first")
    if any(k.startswith("pre_logits/") for k in flat):
        raise ValueError("timm's ViT has no pre_logits layer; drop it with jax_peft.drop_pre_logits(params) "
                         "(fine-tuning does) before converting")
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in flat:
            raise ValueError(f"the tree has no {key!r}: not a complete canonical ViT tree")
        used.add(key)
        return flat[key]

    sd: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str) -> None:
        k, b = take(f"{src}/kernel"), take(f"{src}/bias")
        sd[f"{dst}.weight"] = k.reshape(-1, k.shape[-1]).T if k.ndim == 3 and src.endswith("/out") else \
            k.reshape(k.shape[0], -1).T
        sd[f"{dst}.bias"] = b.reshape(-1)

    def fused(src: str, dst: str, names: tuple[str, ...]) -> None:
        sd[f"{dst}.weight"] = np.concatenate([take(f"{src}/{n}/kernel").reshape(
            flat[f"{src}/{n}/kernel"].shape[0], -1).T for n in names])
        sd[f"{dst}.bias"] = np.concatenate([take(f"{src}/{n}/bias").reshape(-1) for n in names])

    def layer_norm(src: str, dst: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = take(f"{src}/scale"), take(f"{src}/bias")

    sd["patch_embed.proj.weight"] = take("embedding/kernel").transpose(3, 2, 0, 1)
    sd["patch_embed.proj.bias"] = take("embedding/bias")
    if "cls" in flat:
        sd["cls_token"] = take("cls")
    sd["pos_embed"] = take("Transformer/posembed_input/pos_embedding")
    depth = len({m.group(1) for k in flat if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    for i in range(depth):
        src, dst = f"Transformer/encoderblock_{i}", f"blocks.{i}"
        attn = f"{src}/MultiHeadDotProductAttention_0"
        layer_norm(f"{src}/LayerNorm_0", f"{dst}.norm1")
        fused(attn, f"{dst}.attn.qkv", ("query", "key", "value"))
        linear(f"{attn}/out", f"{dst}.attn.proj")
        layer_norm(f"{src}/LayerNorm_1", f"{dst}.norm2")
        linear(f"{src}/MlpBlock_0/Dense_0", f"{dst}.mlp.fc1")
        linear(f"{src}/MlpBlock_0/Dense_1", f"{dst}.mlp.fc2")
    layer_norm("Transformer/encoder_norm", "norm")
    if "MAPHead_0/probe" in flat:
        attn = "MAPHead_0/MultiHeadDotProductAttention_0"
        sd["attn_pool.latent"] = take("MAPHead_0/probe")
        fused(attn, "attn_pool.q", ("query",))
        fused(attn, "attn_pool.kv", ("key", "value"))
        linear(f"{attn}/out", "attn_pool.proj")
        layer_norm("MAPHead_0/LayerNorm_0", "attn_pool.norm")
        linear("MAPHead_0/MlpBlock_0/Dense_0", "attn_pool.mlp.fc1")
        linear("MAPHead_0/MlpBlock_0/Dense_1", "attn_pool.mlp.fc2")
    if "head/kernel" in flat:
        linear("head", "head")
    unused = sorted(set(flat) - used)
    if unused:
        raise ValueError(f"the tree has leaves a timm ViT has no place for: {unused[:6]}. Merge adapters "
                         "into the weights first (jax_peft.merge) and pass the merged tree.")
    return sd


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A timm weight file (`.safetensors`, or a `.pth`/`.bin` zip read without running code) as
    a flat {name: array}."""
    from jax_peft.torch_io import read_state_dict

    return read_state_dict(path)


def load(path_or_url: str | os.PathLike, *, num_heads: int | None = None,
         cache_dir: str | os.PathLike | None = None, progress: bool = True, force_download: bool = False,
         verify: bool = True) -> dict:
    """A timm ViT checkpoint as the canonical tree: a local `.safetensors`/`.pth`, an https URL,
    or `hf-hub:timm/<name>` (the Hub's `model.safetensors`, downloaded into jax_peft's cache)."""
    from jax_peft.download import fetch

    path = fetch(path_or_url, cache_dir=cache_dir, progress=progress, force_download=force_download,
                 verify=verify)
    return from_timm(read(path), num_heads=num_heads)


def save(path: str | os.PathLike, params: Tree) -> Path:
    """Writes `to_timm(params)` as `.safetensors` (atomically) for timm's `load_state_dict`."""
    from jax_peft.torch_io import save_safetensors

    path = Path(os.path.expanduser(os.fspath(path)))
    if path.suffix != ".safetensors":
        raise ValueError(f"timm weights are written as .safetensors; got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, to_timm(params), metadata={"format": "pt"})
    return path
