"""Cross-check the Swin export against timm's PyTorch SwinTransformer (verification only).

Two steps, in two environments (torch is never a jax_peft dependency)::

    python scripts/swin_timm_check.py export DIR     # jax_peft's env: writes DIR/*.safetensors, *.npy
    python scripts/swin_timm_check.py check DIR      # an env with torch and timm >= 0.9

`export` takes the tiny Swin of tests/data/swin/plain.npz and writes (1) its timm-layout export, (2)
the window-8 tree from `jax_peft.swin.adapt_to_config` (relative-position tables resized 7x7 -> 15x15)
and (3) the merged RLRR Swin of tests/data/swin/rlrr.npz, with jax_peft's logits for each. `check`
loads (1) with `load_state_dict(strict=True)`, resizes (1) with timm's own `checkpoint_filter_fn` for
a window-8 model, loads (3) into a model given a reduction bias, and prints the relative logit and
table differences (float32; measured 4.4e-7, 9.8e-8 / 2.2e-7 and 3.3e-7 with timm 1.0.31).
"""

from __future__ import annotations

import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "swin"
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)


def export(out: Path) -> None:
    import numpy as np

    import jax_peft

    out.mkdir(parents=True, exist_ok=True)
    z = np.load(DATA / "plain.npz")
    sd = {k[len("backbone/"):]: z[k] for k in z.files if k.startswith("backbone/")}
    sd["head.weight"], sd["head.bias"] = z["head/weight"], z["head/bias"]
    params = jax_peft.swin.from_state_dict(sd)
    cfg = jax_peft.swin_config(params, image_size=32)
    x = z["x"].astype(np.float32)
    np.save(out / "x.npy", x)
    jax_peft.save_checkpoint(out / "tiny.safetensors", params)
    np.save(out / "tiny.npy", np.asarray(jax_peft.Swin(cfg).apply({"params": params}, x)))
    cfg8 = cfg.replace(window_size=8)
    p8 = jax_peft.swin.adapt_to_config(params, cfg8)
    np.save(out / "table8.npy", np.asarray(p8["layers_0"]["blocks_0"]["attn"]["relative_position_bias_table"]))
    np.save(out / "window8.npy", np.asarray(jax_peft.Swin(cfg8).apply({"params": p8}, x)))
    r = np.load(DATA / "rlrr.npz")
    adapter = jax_peft.from_official("rlrr", {k[8:]: r[k] for k in r.files if k.startswith("adapter/")},
                                     params=params)
    merged = jax_peft.merge(params, jax_peft.get_method("rlrr_swin"), adapter)
    jax_peft.save_checkpoint(out / "rlrr_merged.safetensors", merged)
    np.save(out / "rlrr_merged.npy", np.asarray(jax_peft.Swin(cfg).apply({"params": merged}, x)))
    print(f"wrote {out}")


def check(out: Path) -> None:
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

    x = torch.from_numpy(np.load(out / "x.npy")).permute(0, 3, 1, 2)

    def rel(a, b) -> float:
        return float(np.abs(a - b).max() / np.abs(b).max())

    def run(model) -> np.ndarray:
        with torch.no_grad():
            return model.eval()(x).numpy()

    m = SwinTransformer(window_size=4, **TINY)
    sd = load_file(out / "tiny.safetensors")
    m.load_state_dict(sd, strict=True)
    print("export, strict load: logits rel diff", rel(run(m), np.load(out / "tiny.npy")))
    m8 = SwinTransformer(window_size=8, **TINY)
    sd8 = checkpoint_filter_fn(dict(sd), m8)
    print("timm's table resize vs ours: rel diff",
          rel(np.load(out / "table8.npy"), sd8["layers.0.blocks.0.attn.relative_position_bias_table"].numpy()))
    m8.load_state_dict(sd8, strict=True)
    print("window 8: logits rel diff", rel(run(m8), np.load(out / "window8.npy")))
    red = m.layers[1].downsample.reduction  # timm >= 0.9: the merging sits at the start of stage 1
    red.bias = torch.nn.Parameter(torch.zeros(red.out_features))
    m.load_state_dict(load_file(out / "rlrr_merged.safetensors"), strict=True)
    print("merged RLRR (reduction bias added to timm's model): logits rel diff",
          rel(run(m), np.load(out / "rlrr_merged.npy")))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("export", "check"):
        sys.exit(__doc__)
    (export if sys.argv[1] == "export" else check)(Path(sys.argv[2]))
