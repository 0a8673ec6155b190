"""Cross-check of jax_peft's interop against the real timm, HF PEFT and timm's big_vision npz loader.

Three steps in two Python environments (one with torch + timm + peft, one with jax_peft), on tiny
random models (width 64, 2 blocks, 4 heads, 32 px) that the script creates; no download:

    $TORCH_PY scripts/interop_crosscheck.py torch-write DIR   # timm ViTs (token, map, avg, no_embed_class)
                                                             # and PEFT LoRA adapters -> files + logits
    $JAX_PY   scripts/interop_crosscheck.py jax DIR           # jax_peft reads them, compares logits and
                                                             # merges, writes timm/big_vision/PEFT files
    $TORCH_PY scripts/interop_crosscheck.py torch-check DIR   # timm (strict) and PEFT load those files

Each line printed is one comparison (relative max error of logits, or max |difference| of weights).
"""

from __future__ import annotations

import os
import sys

import numpy as np

KW = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=5)
VARIANTS = {"token": dict(), "map": dict(class_token=False, global_pool="map"),
            "avg": dict(class_token=False, global_pool="avg", fc_norm=False), "noembcls": dict(no_embed_class=True)}


def rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def torch_write(out: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    np.save(f"{out}/x_nchw.npy", x.numpy())

    def randomize(m):
        with torch.no_grad():
            for n, p in m.named_parameters():
                one = 1.0 if n.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0
                p.copy_(torch.randn_like(p) * (0.5 if p.ndim < 2 else 1 / p.shape[-1] ** 0.5) + one)

    def save(m, path):
        save_file({k: t.contiguous() for k, t in m.state_dict().items()}, path)

    ref = {}
    for name, v in VARIANTS.items():
        m = VisionTransformer(**KW, **v).eval()
        randomize(m)
        save(m, f"{out}/{name}.safetensors")
        with torch.no_grad():
            ref[name] = m(x).numpy()
    configs = {"qkv": dict(target_modules=["qkv"], r=4, lora_alpha=8),
               "proj": dict(target_modules=["proj", "fc1", "fc2"], r=4, lora_alpha=8, use_rslora=True,
                            layers_to_transform=[1], layers_pattern="blocks")}
    for tag, cfg in configs.items():
        m = VisionTransformer(**KW).eval()
        randomize(m)
        save(m, f"{out}/peft_base_{tag}.safetensors")
        pm = get_peft_model(m, LoraConfig(**cfg, lora_dropout=0.0))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn_like(p) * 0.3)
        pm.save_pretrained(f"{out}/adapter_{tag}")
        merged = pm.merge_and_unload()
        save(merged, f"{out}/peft_merged_{tag}.safetensors")
        with torch.no_grad():
            ref[f"peft_{tag}"] = merged(x).numpy()
    np.savez(f"{out}/ref_logits.npz", **ref)


def jax_side(out: str) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import jax_peft
    from jax_peft import convert, timm_vit
    from jax_peft.torch_io import read_state_dict

    x = np.load(f"{out}/x_nchw.npy").transpose(0, 2, 3, 1)
    ref = dict(np.load(f"{out}/ref_logits.npz"))
    for name in VARIANTS:
        p = jax_peft.load_checkpoint(f"{out}/{name}.safetensors", num_heads=4)
        cfg = jax_peft.vit_config(p)
        logits = jax_peft.ViT(cfg).apply({"params": p}, x)
        print(f"jax_peft reads timm {name:9s} (classifier {cfg.classifier}): "
              f"logits rel.err {rel(logits, ref[name]):.2e}")
        jax_peft.save_checkpoint(f"{out}/jx_{name}.safetensors", p)
        if name == "map":
            jax_peft.save_checkpoint(f"{out}/jx_map_bv.npz", p, layout="big_vision")
    for tag in ("qkv", "proj"):
        base = jax_peft.load_checkpoint(f"{out}/peft_base_{tag}.safetensors", num_heads=4)
        method, adapter, _ = convert.from_hf_peft(f"{out}/adapter_{tag}", params=base)
        merged = jax_peft.merge(base, method, adapter)
        want = read_state_dict(f"{out}/peft_merged_{tag}.safetensors")
        got = timm_vit.to_timm(merged)
        err = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
        logits = jax_peft.ViT(jax_peft.vit_config(merged)).apply({"params": merged}, x)
        print(f"jax_peft imports PEFT adapter {tag:4s} (variant {method.variant}, scale {method.scale:g}): "
              f"max|merge - merge_and_unload| {err:.2e}, logits rel.err {rel(logits, ref['peft_' + tag]):.2e}")
        convert.to_hf_peft(method, adapter, f"{out}/jx_adapter_{tag}")
        jax_peft.save_checkpoint(f"{out}/jx_merged_{tag}.safetensors", merged)
    # jax_peft's default LoRA (separate q and v pairs), trained-like random values, exported for PEFT
    base = jax_peft.load_checkpoint(f"{out}/peft_base_qkv.safetensors", num_heads=4)
    method = jax_peft.get_method("lora", rank=3, alpha=6.0)
    rng = np.random.default_rng(0)
    adapter = jax.tree_util.tree_map(lambda a: 0.3 * rng.standard_normal(np.shape(a)).astype(np.float32),
                                     method.init(jax.random.PRNGKey(0), base))
    convert.to_hf_peft(method, adapter, f"{out}/jx_adapter_qv")
    jax_peft.save_checkpoint(f"{out}/jx_merged_qv.safetensors", jax_peft.merge(base, method, adapter))


def torch_check(out: str) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    x = torch.from_numpy(np.load(f"{out}/x_nchw.npy"))
    ref = dict(np.load(f"{out}/ref_logits.npz"))
    for name, v in VARIANTS.items():
        m = VisionTransformer(**KW, **{**v, "no_embed_class": False}).eval()  # jax_peft writes the CLS row
        m.load_state_dict(load_file(f"{out}/jx_{name}.safetensors"), strict=True)
        with torch.no_grad():
            print(f"timm loads jax_peft's {name:9s} (strict): logits rel.err {rel(m(x).numpy(), ref[name]):.2e}")
    m = VisionTransformer(**KW, **VARIANTS["map"]).eval()
    m.load_pretrained(f"{out}/jx_map_bv.npz")
    with torch.no_grad():
        print("timm's npz loader reads jax_peft's big_vision MAP file: "
              f"logits rel.err {rel(m(x).numpy(), ref['map']):.2e}")
    for tag in ("qkv", "proj"):
        base = VisionTransformer(**KW).eval()
        base.load_state_dict(load_file(f"{out}/peft_base_{tag}.safetensors"))
        pm = PeftModel.from_pretrained(base, f"{out}/jx_adapter_{tag}")
        adapted = sorted({n.split(".lora_A")[0].removeprefix("base_model.model.")
                          for n, _ in pm.named_parameters() if "lora_A" in n})
        merged = pm.merge_and_unload().eval()
        want = load_file(f"{out}/peft_merged_{tag}.safetensors")
        err = max(float((merged.state_dict()[k] - want[k]).abs().max()) for k in want)
        m2 = VisionTransformer(**KW).eval()
        m2.load_state_dict(load_file(f"{out}/jx_merged_{tag}.safetensors"))
        with torch.no_grad():
            print(f"PEFT loads jax_peft's adapter {tag} on {adapted}: max|merge - original| {err:.2e}; "
                  f"jax_peft's merged file: logits rel.err {rel(m2(x).numpy(), ref['peft_' + tag]):.2e}")
    base = VisionTransformer(**KW).eval()
    base.load_state_dict(load_file(f"{out}/peft_base_qkv.safetensors"))
    merged = PeftModel.from_pretrained(base, f"{out}/jx_adapter_qv").merge_and_unload().eval()
    want = load_file(f"{out}/jx_merged_qv.safetensors")
    err = max(float((merged.state_dict()[k] - want[k]).abs().max()) for k in want)
    print(f"PEFT merges jax_peft's q,v LoRA (exported as fused qkv, rank 6): max|PEFT merge - jax_peft merge| {err:.2e}")


if __name__ == "__main__":
    steps = {"torch-write": torch_write, "jax": jax_side, "torch-check": torch_check}
    if len(sys.argv) != 3 or sys.argv[1] not in steps:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(steps)}}} DIR")
    steps[sys.argv[1]](sys.argv[2])
