"""HF PEFT LoRA adapters of timm ViTs: import, merge and export, on adapter files the tests write.

The expected merge is HF PEFT's `merge_and_unload()` as its LoRA layer defines it: for each adapted
nn.Linear, `W <- W + scaling · (lora_B.weight @ lora_A.weight)` with `scaling = lora_alpha / r`
(`lora_alpha / sqrt(r)` when `use_rslora`); every other weight is unchanged.
"""

from __future__ import annotations

import json
import math
import re

import jax
import numpy as np
import pytest
from test_interop_timm import DEPTH, D, H, M, timm_state_dict

import jax_peft
from jax_peft import convert, timm_vit
from jax_peft.torch_io import read_state_dict, save_safetensors

PRE = "base_model.model."
OUT = {"attn.qkv": 3 * D, "attn.proj": D, "mlp.fc1": M, "mlp.fc2": D}
IN = {"attn.qkv": D, "attn.proj": D, "mlp.fc1": D, "mlp.fc2": M}


def write_peft_adapter(path, modules, blocks, r=4, alpha=16.0, rslora=False, head=False, seed=0, **extra):
    """What PEFT's save_pretrained writes for LoRA on `modules` of `blocks` (random, non-zero B)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in blocks:
        for m in modules:
            tensors[f"{PRE}blocks.{i}.{m}.lora_A.weight"] = rng.standard_normal((r, IN[m])).astype(np.float32) / 4
            tensors[f"{PRE}blocks.{i}.{m}.lora_B.weight"] = rng.standard_normal((OUT[m], r)).astype(np.float32) / 4
    if head:
        tensors[f"{PRE}head.weight"] = rng.standard_normal((5, D)).astype(np.float32)
        tensors[f"{PRE}head.bias"] = rng.standard_normal(5).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(path / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.1, "use_rslora": rslora,
              "target_modules": [m.split(".")[-1] for m in modules], "bias": "none", "use_dora": False,
              "layers_to_transform": None if list(blocks) == list(range(DEPTH)) else list(blocks),
              "modules_to_save": ["head"] if head else None, "rank_pattern": {}, "alpha_pattern": {},
              "fan_in_fan_out": False, **extra}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def peft_merge_and_unload(sd, tensors, scaling):
    out = dict(sd)
    for k in tensors:
        if k.endswith(".lora_A.weight"):
            module = k[len(PRE):-len(".lora_A.weight")]
            a, b = tensors[k].astype(np.float64), tensors[k.replace("lora_A", "lora_B")].astype(np.float64)
            out[f"{module}.weight"] = sd[f"{module}.weight"] + scaling * (b @ a)
    return out


@pytest.mark.parametrize("modules,blocks,rslora", [
    (("attn.qkv",), (0, 1), False),                         # NOAH-style fused qkv, every block
    (("attn.proj", "mlp.fc1", "mlp.fc2"), (1,), True),      # per-projection, one block, rsLoRA
])
def test_import_merge_equals_merge_and_unload_and_export_round_trips(tmp_path, modules, blocks, rslora):
    sd = timm_state_dict("token", seed=5)
    params = timm_vit.from_timm(sd, num_heads=H)
    tensors = write_peft_adapter(tmp_path / "in", modules, blocks, rslora=rslora, head=not rslora)
    method, adapter, head = convert.from_hf_peft(tmp_path / "in", params=params)
    assert method.name == "lora" and method.rank == 4 and method.dropout == 0.1
    assert method.variant == ("fused_qkv" if modules == ("attn.qkv",) else "separate")
    assert method.layers == (None if len(blocks) == DEPTH else tuple(blocks))
    scaling = 16.0 / (math.sqrt(4) if rslora else 4)
    assert method.scale == pytest.approx(scaling)

    merged = timm_vit.to_timm(jax_peft.merge(params, method, adapter))
    expected = peft_merge_and_unload(sd, tensors, scaling)
    assert sorted(merged) == sorted(expected)
    for k in expected:
        np.testing.assert_allclose(merged[k], expected[k], rtol=2e-6, atol=2e-6, err_msg=k)
    if head is not None:
        np.testing.assert_array_equal(head["kernel"], tensors[f"{PRE}head.weight"].T)

    out = convert.to_hf_peft(method, adapter, tmp_path / "out", head=head)
    written = read_state_dict(out / "adapter_model.safetensors")
    assert sorted(written) == sorted(tensors)
    for k in tensors:
        np.testing.assert_array_equal(written[k], tensors[k], err_msg=k)
    again = convert.from_hf_peft(out, params=params)
    assert again.method.scale == pytest.approx(method.scale) and again.method.layers == method.layers
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == pytest.approx(method.scale * 4)
    names = [f"blocks.{i}.{m}" for i in range(DEPTH) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    names += ["patch_embed.proj", "head"]
    hit = {n for n in names if re.fullmatch(cfg["target_modules"], n)}  # PEFT's rule for a str target
    assert hit == {f"blocks.{i}.{m}" for i in blocks for m in modules}


def test_unsupported_adapters_are_refused_by_name(tmp_path):
    write_peft_adapter(tmp_path / "mix", ("attn.qkv", "attn.proj"), (0, 1))
    with pytest.raises(ValueError, match=r"fused attn\.qkv together with \['attn\.proj'\]"):
        convert.from_hf_peft(tmp_path / "mix")
    write_peft_adapter(tmp_path / "dora", ("attn.qkv",), (0, 1), use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        convert.from_hf_peft(tmp_path / "dora")
    d = tmp_path / "conv"
    write_peft_adapter(d, ("attn.proj",), (0,))
    extra = read_state_dict(d / "adapter_model.safetensors")
    extra[f"{PRE}patch_embed.proj.lora_A.weight"] = np.zeros((4, 3, 8, 8), np.float32)
    extra[f"{PRE}patch_embed.proj.lora_B.weight"] = np.zeros((D, 4, 1, 1), np.float32)
    save_safetensors(d / "adapter_model.safetensors", extra)
    with pytest.raises(ValueError, match="'patch_embed.proj'"):
        convert.from_hf_peft(d)
    params = timm_vit.from_timm(timm_state_dict("token"), num_heads=H)
    method = jax_peft.get_method("lora", rank=2, targets=("q", "v", "fc1"))
    with pytest.raises(ValueError, match="two adapters"):
        convert.to_hf_peft(method, method.init(jax.random.PRNGKey(0), params), tmp_path / "qvfc1")
    with pytest.raises(ValueError, match="no LoRA pairs"):
        convert.to_hf_peft(method, {}, tmp_path / "empty")


def test_default_q_v_lora_exports_as_one_exact_fused_qkv_pair(tmp_path):
    """jax_peft's default LoRA (separate q and v pairs) -> timm's fused qkv with rank 2r, same merge."""
    sd = timm_state_dict("token", seed=6)
    params = timm_vit.from_timm(sd, num_heads=H)
    method = jax_peft.get_method("lora", rank=3, alpha=6.0, layers=(1,))
    rng = np.random.default_rng(0)
    adapter = jax.tree_util.tree_map(lambda x: rng.standard_normal(np.shape(x)).astype(np.float32),
                                     method.init(jax.random.PRNGKey(0), params))
    out = convert.to_hf_peft(method, adapter, tmp_path / "qv")
    cfg = json.loads((out / "adapter_config.json").read_text())
    tensors = read_state_dict(out / "adapter_model.safetensors")
    assert cfg["r"] == 6 and sorted(tensors) == [f"{PRE}blocks.1.attn.qkv.lora_{x}.weight" for x in "AB"]
    expected = peft_merge_and_unload(sd, tensors, cfg["lora_alpha"] / cfg["r"])
    merged = timm_vit.to_timm(jax_peft.merge(params, method, adapter))
    for k in expected:
        np.testing.assert_allclose(merged[k], expected[k], rtol=2e-6, atol=2e-6, err_msg=k)
    back = convert.from_hf_peft(out, params=params)
    assert (back.method.variant, back.method.rank, back.method.layers) == ("fused_qkv", 6, (1,))
