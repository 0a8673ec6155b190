"""Swin checkpoints: PyTorch state dicts (Microsoft's and timm's layouts) <-> the canonical Flax tree.

Two PyTorch layouts exist for the same weights:

    Microsoft (the released `.pth` files, timm <= 0.6)   layers.i.downsample = merging at the END of
                                                         stage i; classifier `head`
    timm >= 0.9 (`.safetensors` on the Hugging Face hub) layers.i.downsample = merging at the START of
                                                         stage i (i >= 1); classifier `head.fc`

`from_state_dict` reads either (the layout is recognized from the names), `to_state_dict` writes
either (timm's by default). Buffers (`relative_position_index`, `attn_mask`) are skipped when read
and recomputed by the model. Weights map as: Linear weight (out, in) -> kernel (in, out); the patch
embedding's conv weight OIHW -> HWIO; LayerNorm weight -> scale.

Windows: when a model is built for another image size or window than the file's (e.g. 224 px,
window 7 -> 384 px, window 12), `adapt_to_config` resizes every relative-position bias table by
timm's rule (`resize_bias_table`) and resets the head when the class count differs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from jax_peft import paths
from jax_peft.swin import (
    SwinConfig,
    is_swin_params,
    param_shapes,
    relative_position_index,
    shift_mask,
    swin_config,
)

Tree = Mapping[str, Any]
BUFFERS = ("relative_position_index", "attn_mask")
_WRAPPERS = ("module.", "model.", "backbone.", "encoder.")
_NORMS = ("norm", "norm1", "norm2")


class SwinCheckpointError(ValueError):
    """A state dict is not a Swin Transformer's, or does not fit the requested config."""


def is_swin_state_dict(sd: Mapping[str, Any]) -> bool:
    """True when the flat names look like a Swin Transformer's (either layout, any wrapper prefix)."""
    return any(re.search(r"(^|\.)layers\.0\.blocks\.0\.attn\.relative_position_bias_table$", k) for k in sd)


def _strip_wrapper(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Drops one common wrapper prefix ('module.' of DistributedDataParallel, 'model.', ...)."""
    for prefix in _WRAPPERS:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def detect_layout(names: Any) -> Literal["microsoft", "timm"]:
    """'timm' when the names hold `head.fc.*` or a merging under a stage > 0 but none under stage 0
    (timm >= 0.9), else 'microsoft' (the released .pth files, timm <= 0.6)."""
    names = list(names)
    if any(k.startswith("head.fc.") for k in names):
        return "timm"
    stages = {int(m.group(1)) for k in names if (m := re.match(r"layers\.(\d+)\.downsample\.", k))}
    return "timm" if stages and 0 not in stages else "microsoft"


def _torch_to_path(name: str) -> tuple[str, str]:
    """'layers.0.blocks.1.attn.qkv.weight' -> ('layers_0/blocks_1/attn/qkv', 'weight')."""
    module, _, leaf = name.rpartition(".")
    module = re.sub(r"(layers|blocks)\.(\d+)", r"\1_\2", module)
    return module.replace(".", "/"), leaf


def _path_to_torch(path: str) -> str:
    return re.sub(r"(layers|blocks)_(\d+)", r"\1.\2", path).replace("/", ".")


def _is_norm(module: str) -> bool:
    return module.rsplit("/", 1)[-1] in _NORMS


def from_state_dict(state_dict: Mapping[str, Any], *, dtype: Any = np.float32) -> dict:
    """A flat {PyTorch name: array} Swin state dict (Microsoft or timm layout) -> canonical tree.

    Accepts numpy arrays (or anything `np.asarray` takes) and one wrapper prefix such as 'module.';
    a {'model': state_dict} container as stored in Microsoft's files is unwrapped. Buffers are
    skipped. Floating arrays are cast to `dtype` (None keeps them). Raises SwinCheckpointError
    naming every name it cannot place.
    """
    sd = dict(state_dict)
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = dict(sd["model"])
    sd = _strip_wrapper(sd)
    if not is_swin_state_dict(sd):
        sample = ", ".join(list(sd)[:5])
        raise SwinCheckpointError(
            f"not a Swin Transformer state dict: no 'layers.0.blocks.0.attn.relative_position_bias_table'. "
            f"Names look like: {sample}. Pass the state dict of a timm/Microsoft SwinTransformer (V1).")
    layout = detect_layout(sd)
    out: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for name, value in sd.items():
        if name.rsplit(".", 1)[-1] in BUFFERS:
            continue
        if layout == "timm":
            name = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.",
                          name)
            name = re.sub(r"^head\.fc\.", "head.", name)
        module, leaf = _torch_to_path(name)
        arr = np.asarray(value)
        if dtype is not None and arr.dtype.kind == "f":
            arr = arr.astype(dtype)
        if leaf == "relative_position_bias_table" and module.endswith("/attn"):
            out[f"{module}/{leaf}"] = arr
        elif leaf == "weight" and _is_norm(module) and arr.ndim == 1:
            out[f"{module}/scale"] = arr
        elif leaf == "weight" and arr.ndim == 4 and module == "patch_embed/proj":
            out[f"{module}/kernel"] = arr.transpose(2, 3, 1, 0)
        elif leaf == "weight" and arr.ndim == 2:
            out[f"{module}/kernel"] = arr.T
        elif leaf == "bias" and arr.ndim == 1:
            out[f"{module}/bias"] = arr
        else:
            unknown.append(f"{name} {tuple(arr.shape)}")
    if unknown:
        raise SwinCheckpointError(
            f"{len(unknown)} tensor(s) of the state dict have no place in a Swin (V1) Transformer: "
            f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}. Swin V2 and other variants are "
            "not supported; remove extra entries (e.g. adapters) before converting.")
    return paths.unflatten(out)


def to_state_dict(params: Tree, *, layout: Literal["timm", "microsoft"] = "timm", dtype: Any = np.float32,
                  buffers: bool = False, config: SwinConfig | None = None) -> dict[str, np.ndarray]:
    """Canonical tree -> flat {PyTorch name: numpy array} (cast to `dtype`; None keeps each leaf's).

    layout="timm" (default) is what timm >= 0.9's `SwinTransformer.load_state_dict` takes
    (merging at the start of the next stage, `head.fc`); "microsoft" is the released files' layout.
    `buffers=True` adds the recomputed `relative_position_index` (int64) and `attn_mask` buffers,
    which the Microsoft model and timm <= 0.6 keep in their state dicts (needs `config` when the
    image size is not 224; the tree alone does not know it).
    """
    if not is_swin_params(params):
        raise ValueError("to_state_dict needs a canonical Swin tree (patch_embed, layers_0, ...); merge "
                         "adapters first with jax_peft.merge")
    if layout not in ("timm", "microsoft"):
        raise ValueError(f"layout must be 'timm' or 'microsoft', got {layout!r}")
    out: dict[str, np.ndarray] = {}
    for path, value in paths.flatten(params).items():
        module, _, leaf = path.rpartition("/")
        arr = np.asarray(value) if dtype is None else np.asarray(value, dtype)
        if leaf == "kernel":
            arr, leaf = (arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T), "weight"
        elif leaf == "scale":
            leaf = "weight"
        name = f"{_path_to_torch(module)}.{leaf}"
        if layout == "timm":
            name = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.",
                          name)
            name = re.sub(r"^head\.", "head.fc.", name)
        out[name] = np.ascontiguousarray(arr)
    if buffers:
        c = config or swin_config(params)
        for i, depth in enumerate(c.depths):
            w, s = c.stage_window(i), c.stage_shift(i)
            for j in range(depth):
                out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = relative_position_index(w).copy()
                if j % 2 and s:
                    out[f"layers.{i}.blocks.{j}.attn_mask"] = shift_mask(c.stage_resolution(i), w, s).astype(
                        np.float32)
    return out


# ---------------------------------------------------------------------------- window resizing


def _progression_positions(src: int, dst: int) -> np.ndarray:
    """Source grid positions of timm's rule: offsets 0, ±1, ±(1 + q), ±(1 + q + q²), ... with q found
    by bisection so that the src // 2 offsets reach about dst // 2."""
    left, right = 1.01, 1.5
    q = left
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return np.asarray([-d for d in reversed(dis)] + [0.0] + dis)


def _linear_weights(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(len(targets), len(points)) piecewise-linear interpolation weights on an uneven grid, clamped
    to the end values outside it."""
    w = np.zeros((len(targets), len(points)))
    for t, x in enumerate(targets):
        hi = int(np.searchsorted(points, x, side="left"))
        if hi == 0:
            w[t, 0] = 1.0
        elif hi >= len(points):
            w[t, -1] = 1.0
        else:
            lo = hi - 1
            a = (x - points[lo]) / (points[hi] - points[lo])
            w[t, lo], w[t, hi] = 1.0 - a, a
    return w


def resize_bias_table(table: Any, window: int) -> np.ndarray:
    """A relative-position bias table ((2w - 1)², H) resized to window `window`, by timm's rule
    (`resize_rel_pos_bias_table`, its default without scipy): the source offsets are placed on a
    geometric progression spanning the target's range, and each head is resampled bilinearly at
    the target's integer offsets."""
    table = np.asarray(table)
    rows, heads = table.shape
    src = int(round(rows**0.5))
    dst = 2 * window - 1
    if src * src != rows:
        raise ValueError(f"a bias table has (2w - 1)**2 rows; got {rows}")
    if src == dst:
        return table
    pos = _progression_positions(src, dst)
    t = dst // 2
    wts = _linear_weights(pos, np.arange(-t, t + 0.1, 1.0))  # (dst, src), the same on both axes
    grid = table.astype(np.float64).reshape(src, src, heads)
    out = np.einsum("ys,xt,sth->yxh", wts, wts, grid)
    return out.reshape(dst * dst, heads).astype(table.dtype)


def adapt_to_config(params: Tree, config: SwinConfig, *, head: Literal["auto", "keep", "reset"] = "auto") -> dict:
    """Fits a Swin tree to `config`: every bias table resized to its stage's window (timm's rule),
    the head reset to zeros when `head="reset"` or ("auto") its shape differs; then validated."""
    if head not in ("auto", "keep", "reset"):
        raise ValueError(f"head must be 'auto', 'keep' or 'reset', got {head!r}")
    flat = dict(paths.flatten(params))
    for k in flat:
        m = re.match(r"layers_(\d+)/blocks_\d+/attn/relative_position_bias_table$", k)
        if m:
            flat[k] = resize_bias_table(flat[k], config.stage_window(int(m.group(1))))
    want = (config.hidden_size, config.num_classes)
    have = tuple(np.shape(flat["head/kernel"])) if "head/kernel" in flat else None
    if head == "reset" or (head == "auto" and have != want):
        flat["head/kernel"] = np.zeros(want, np.float32)
        flat["head/bias"] = np.zeros((config.num_classes,), np.float32)
    tree = paths.unflatten(flat)
    validate_params(tree, config)
    return tree


def validate_params(params: Tree, config: SwinConfig) -> None:
    """Raises one ValueError listing every missing, unexpected and mis-shaped leaf against `config`
    (an optional `bias` beside a merging reduction, as a merged RLRR Swin has, is allowed)."""
    expected = {k: tuple(v.shape) for k, v in paths.flatten(param_shapes(config)).items()}
    got = {k: tuple(np.shape(v)) for k, v in paths.flatten(params).items()}
    for k in got:  # a merged RLRR Swin gives the merging reductions a bias (the model uses it)
        if re.fullmatch(r"layers_\d+/downsample/reduction/bias", k) and k[:-4] + "kernel" in expected:
            expected[k] = expected[k[:-4] + "kernel"][-1:]
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [f"{k}: got {got[k]}, expected {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or wrong:
        lines = [f"parameters do not match the Swin config {config.name} (embed {config.embed_dim}, depths "
                 f"{config.depths}, heads {config.num_heads}, window {config.window_size}, image "
                 f"{config.image_size}, {config.num_classes} classes):"]
        for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                lines.append(f"  {what} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        lines.append("Fix: build the config from the tree (jax_peft.swin_config(params, image_size=...)) or "
                     "load with load_checkpoint(path, config=cfg), which resizes bias tables and resets the head.")
        raise ValueError("\n".join(lines))


def load(path: str | os.PathLike, *, config: SwinConfig | None = None, head: str = "auto",
         dtype: Any = np.float32) -> dict:
    """A Swin checkpoint file (Microsoft `.pth`, timm `.pth` / `.safetensors`) as a canonical tree,
    adapted to `config` when given (see `adapt_to_config`)."""
    from jax_peft.torch_io import read_state_dict

    return load_state_dict(read_state_dict(path), config=config, head=head, dtype=dtype, source=os.fspath(path))


def load_state_dict(state_dict: Mapping[str, Any], *, config: SwinConfig | None = None, head: str = "auto",
                    dtype: Any = np.float32, source: str = "the state dict") -> dict:
    """`load` for weights already read (a flat {torch name: array} of a Swin Transformer)."""
    if config is not None and not isinstance(config, SwinConfig):
        raise TypeError(f"{source} holds Swin Transformer weights: pass a SwinConfig "
                        f"(jax_peft.swin_config(...)), not a {type(config).__name__}")
    params = from_state_dict(state_dict, dtype=dtype)
    if config is not None:
        params = adapt_to_config(params, config, head=head)  # type: ignore[arg-type]
    return params


def save(path: str | os.PathLike, params: Tree, *, layout: Literal["timm", "microsoft"] = "timm") -> str:
    """Writes a plain Swin tree as PyTorch weights, atomically: `.safetensors` or `.pth` (a bare
    state dict, `torch.load(path, weights_only=True)` reads it), float32, timm's layout by default.
    `load_checkpoint` reads the file back to the same tree."""
    from jax_peft import torch_io

    path = os.fspath(os.path.expanduser(os.fspath(path)))
    sd = to_state_dict(params, layout=layout)
    if path.endswith(".safetensors"):
        torch_io.save_safetensors(path, sd)
    elif path.endswith((".pth", ".pt")):
        torch_io.save_pth(path, sd)
    else:
        raise ValueError(f"a Swin tree is saved as PyTorch weights: give {path!r} the suffix .safetensors "
                         "or .pth (the Google .npz layout is for ViTs only)")
    return path
