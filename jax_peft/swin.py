"""A Flax (linen) Swin Transformer (Liu et al. 2021) whose parameter tree mirrors the PyTorch names.

Canonical parameter tree, for stage widths D_i = embed_dim * 2**i, heads H_i, window w_i (the
configured window, clipped to the stage resolution when that is smaller), patch P, depth L_i of
stage i and C classes (Microsoft's layout: the patch merging of stage i sits at the END of stage i,
so the last stage has none)::

    patch_embed/proj/{kernel (P, P, 3, D_0), bias (D_0,)}
    patch_embed/norm/{scale, bias}                                        (D_0,)
    layers_{i}/blocks_{j}/norm1/{scale, bias}                             (D_i,)
    layers_{i}/blocks_{j}/attn/qkv/{kernel (D_i, 3 D_i), bias (3 D_i,)}   columns (q|k|v, head, hd)
    layers_{i}/blocks_{j}/attn/relative_position_bias_table               ((2 w_i - 1)**2, H_i)
    layers_{i}/blocks_{j}/attn/proj/{kernel (D_i, D_i), bias (D_i,)}
    layers_{i}/blocks_{j}/norm2/{scale, bias}                             (D_i,)
    layers_{i}/blocks_{j}/mlp/fc1/{kernel (D_i, 4 D_i), bias}
    layers_{i}/blocks_{j}/mlp/fc2/{kernel (4 D_i, D_i), bias}
    layers_{i}/downsample/norm/{scale, bias}                              (4 D_i,)   i < last
    layers_{i}/downsample/reduction/kernel                                (4 D_i, 2 D_i), no bias
    norm/{scale, bias}                                                    (D_last,)
    head/{kernel (D_last, C), bias (C,)}

A leaf's path is its PyTorch name with '/' for '.', `layers_i` for `layers.i`, `blocks_j` for
`blocks.j`, kernel = weight transposed, scale = LayerNorm weight (see `jax_peft.swin_checkpoint`).
The buffers of the PyTorch model (`relative_position_index`, `attn_mask`) are not parameters: they
are recomputed from the config.

Forward (timm's / Microsoft's): conv patch embedding + LayerNorm; per block
`x += attn(LN1(x))`, `x += fc2(gelu(fc1(LN2(x))))`; odd blocks roll the grid by -w/2 before the
window partition and back after it, with a -100 logit penalty between tokens from different
regions of the rolled grid; patch merging concatenates x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2],
x[1::2, 1::2], normalizes and reduces 4D -> 2D; final LayerNorm, mean over tokens, head. LayerNorm
eps is 1e-5 and GELU the exact (erf) one. Images are NHWC floats.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_peft.vit import DropPath, _gelu, _place_columns, _scale_shift, _side, stable_softmax

Array = jax.Array
LN_EPS = 1e-5
MASK_FILL = -100.0  # the official shifted-window penalty (not -inf)

# name -> (embed_dim, depths, heads, window, image_size)
NAMED_CONFIGS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], int, int]] = {
    "Swin-T": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "Swin-S": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
    "Swin-B": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224),
    "Swin-L": (192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224),
    "Swin-B-384": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
    "Swin-L-384": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
}
_TIMM_SIZES = {"tiny": "T", "small": "S", "base": "B", "large": "L"}


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """Architecture and regularization of a Swin Transformer (plain, hashable Python values)."""

    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    image_size: int = 224
    gelu: Literal["exact", "tanh"] = "exact"
    dropout_rate: float = 0.0  # timm's drop_rate: after the patch embedding, proj and the MLP
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0  # linear over all blocks, 0 for the first, as timm
    drop_path_mode: Literal["sample", "element"] = "sample"
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False  # rematerialize each block in the backward pass
    name: str = "custom"

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} need one entry per "
                             "stage (e.g. depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))")
        for i, h in enumerate(self.num_heads):
            if self.stage_dim(i) % h:
                raise ValueError(f"stage {i} width {self.stage_dim(i)} is not divisible by its {h} heads; "
                                 "choose heads that divide embed_dim * 2**stage")
        if self.gelu not in ("exact", "tanh"):
            raise ValueError(f"gelu must be 'exact' or 'tanh', got {self.gelu!r}")
        if self.drop_path_mode not in ("sample", "element"):
            raise ValueError(f"drop_path_mode must be 'sample' or 'element', got {self.drop_path_mode!r}")
        res = self.image_size // self.patch_size
        if self.image_size % self.patch_size or res < 1:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for i in range(self.num_stages):
            r, w = self.stage_resolution(i), self.stage_window(i)
            if r % w:
                raise ValueError(
                    f"stage {i} has a {r}x{r} token grid, not a multiple of its window {w}; pick an image "
                    f"size for which every stage grid is a multiple of window_size={self.window_size} "
                    f"(e.g. 224 for window 7, 384 for window 12)")
            if i < self.num_stages - 1 and r % 2:
                raise ValueError(f"stage {i} has an odd {r}x{r} grid and cannot be merged 2x2; choose an "
                                 f"image size divisible by {self.patch_size * 2 ** (self.num_stages - 1)}")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def num_layers(self) -> int:
        """Blocks in all stages."""
        return sum(self.depths)

    @property
    def hidden_size(self) -> int:
        """Width of the pooled features (the last stage)."""
        return self.stage_dim(self.num_stages - 1)

    def stage_dim(self, i: int) -> int:
        return self.embed_dim * 2**i

    def stage_resolution(self, i: int) -> int:
        return self.image_size // self.patch_size // 2**i

    def stage_window(self, i: int) -> int:
        """The window of stage i: the configured one, or the stage resolution when that is not larger."""
        return min(self.window_size, self.stage_resolution(i))

    def stage_shift(self, i: int) -> int:
        """Shift of the odd blocks of stage i: w // 2, or 0 when the window covers the whole grid."""
        return 0 if self.stage_resolution(i) <= self.window_size else self.window_size // 2

    def replace(self, **changes: Any) -> SwinConfig:
        return dataclasses.replace(self, **changes)


def _canonical_name(name: str) -> str:
    """'Swin-B', 'swin_b', 'swin-base', 'swin_base_patch4_window7_224' -> 'Swin-B'; window-12 / 384
    names -> 'Swin-B-384'."""
    s = name.strip().lower()
    m = re.fullmatch(r"swin[-_ ]?(t|s|b|l|tiny|small|base|large)(?:[-_ /@]?(224|384))?", s)
    if m:
        size = _TIMM_SIZES.get(m.group(1), m.group(1).upper())
        return f"Swin-{size}" + ("-384" if m.group(2) == "384" else "")
    m = re.fullmatch(r"swin_(tiny|small|base|large)_patch4_window(7|12)_(224|384)(?:[._].*)?", s)
    if m:
        return f"Swin-{_TIMM_SIZES[m.group(1)]}" + ("-384" if m.group(3) == "384" else "")
    return name


def swin_config(
    name_or_params: str | Mapping[str, Any] | None = "Swin-B",
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    window_size: int | None = None,
    **overrides: Any,
) -> SwinConfig:
    """Builds a `SwinConfig` from a model name or from a parameter tree.

    Args:
      name_or_params: "Swin-T" | "Swin-S" | "Swin-B" | "Swin-L" (patch 4, window 7, 224 px),
        "Swin-B-384" | "Swin-L-384" (window 12, 384 px), timm names such as
        "swin_base_patch4_window7_224"; or a canonical Swin tree (widths, depths, heads, window and
        classes are read from it; the image size is 224 unless given); or None with every field
        set in `overrides`.
      num_classes: number of classes (default 1000 for names, the head's size for trees).
      image_size, window_size: input resolution and window (defaults from the name or the tree).
      **overrides: any other `SwinConfig` field (dtype="bfloat16", drop_path_rate=0.2, remat=True ...).
    """
    fields = {f.name for f in dataclasses.fields(SwinConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown Swin config option(s) {unknown}; valid options: {sorted(fields)}")
    changes = dict(overrides)
    if name_or_params is None:
        base: dict[str, Any] = {}
    elif isinstance(name_or_params, str):
        canon = _canonical_name(name_or_params)
        if canon not in NAMED_CONFIGS:
            raise ValueError(f"unknown Swin model name {name_or_params!r}; known: {sorted(NAMED_CONFIGS)}. "
                             "For a custom size pass None and set embed_dim, depths, num_heads, window_size.")
        d, depths, heads, w, size = NAMED_CONFIGS[canon]
        base = dict(embed_dim=d, depths=depths, num_heads=heads, window_size=w, image_size=size, name=canon)
    else:
        base = _infer_fields(name_or_params, image_size)
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if image_size is not None:
        changes["image_size"] = image_size
    if window_size is not None:
        changes["window_size"] = window_size
    return SwinConfig(**{**base, **changes})


def _infer_fields(params: Mapping[str, Any], image_size: int | None) -> dict[str, Any]:
    """Architecture fields of a canonical Swin tree (see the module docstring)."""
    try:
        proj = params["patch_embed"]["proj"]["kernel"]
        stages = sorted((k for k in params if re.fullmatch(r"layers_\d+", k)), key=lambda k: int(k[7:]))
        if not stages:
            raise KeyError("layers_0")
        depths, heads = [], []
        for s in stages:
            blocks = [k for k in params[s] if re.fullmatch(r"blocks_\d+", k)]
            if not blocks:
                raise KeyError(f"{s}/blocks_0")
            depths.append(len(blocks))
            heads.append(int(np.shape(params[s]["blocks_0"]["attn"]["relative_position_bias_table"])[1]))
        table = np.shape(params[stages[0]]["blocks_0"]["attn"]["relative_position_bias_table"])[0]
        fc1 = np.shape(params[stages[0]]["blocks_0"]["mlp"]["fc1"]["kernel"])
    except KeyError as e:
        raise ValueError(
            f"cannot infer the Swin architecture: the tree has no {e.args[0]!r}. Pass a tree from "
            "jax_peft.swin.from_state_dict / load_checkpoint, or give a model name instead.") from None
    side = int(round(table**0.5))
    if side * side != table or side % 2 == 0:
        raise ValueError(f"stage 0's relative_position_bias_table has {table} rows, not (2w - 1)**2")
    patch, dim = int(np.shape(proj)[0]), int(np.shape(proj)[-1])
    fields: dict[str, Any] = dict(
        patch_size=patch, embed_dim=dim, depths=tuple(depths), num_heads=tuple(heads),
        window_size=(side + 1) // 2, mlp_ratio=fc1[1] / fc1[0],
        num_classes=int(np.shape(params["head"]["kernel"])[-1]) if "head" in params else 1000)
    for name, (d, ds, hs, w, size) in NAMED_CONFIGS.items():
        if (d, ds, hs, w) == (dim, tuple(depths), tuple(heads), fields["window_size"]) and patch == 4:
            fields.update(name=name, image_size=size)
    if image_size is None and "image_size" not in fields:
        fields["image_size"] = 224
    return fields


# ------------------------------------------------------------------------------ static structure


@functools.cache
def relative_position_index(window: int) -> np.ndarray:
    """(w², w²) int: row of the bias table for query i, key j of a window, tokens row-major:
    (Δrow + w - 1) · (2w - 1) + (Δcol + w - 1)."""
    r, c = np.divmod(np.arange(window * window), window)
    return (r[:, None] - r[None, :] + window - 1) * (2 * window - 1) + (c[:, None] - c[None, :] + window - 1)


def window_partition(x: Array, window: int) -> Array:
    """(B, H, W, C) -> (B · nW, w², C): batch-major, windows row-major, tokens row-major inside."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: Array, window: int, h: int, w: int) -> Array:
    """Inverse of `window_partition`: (B · nW, w², C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


@functools.cache
def shift_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """(nW, w², w²) additive mask of the shifted windows: 0 where two tokens come from the same
    region of the rolled grid (bands [0, H - w), [H - w, H - s), [H - s, H) per axis), else -100."""
    band = np.zeros(resolution, np.int64)
    band[resolution - window:] = 1
    band[resolution - shift:] = 2
    label = (3 * band[:, None] + band[None, :])[None, :, :, None].astype(np.float64)
    win = np.asarray(window_partition(label, window))[..., 0]  # numpy in, numpy out
    return np.where(win[:, None, :] != win[:, :, None], MASK_FILL, 0.0)


# ------------------------------------------------------------------------------------- modules


def _norm(name: str, dt: Any) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dt, name=name)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows (B · nW, N = w², D) with relative position bias."""

    num_heads: int
    window: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: np.ndarray | None, deterministic: bool,
                 side: Mapping[str, Any] | None = None) -> Array:
        bw, n, d = x.shape
        side = side or {}
        h, hd = self.num_heads, d // self.num_heads
        table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                           ((2 * self.window - 1) ** 2, h))
        parts = _qkv_with_side(self, nn.Dense(3 * d, dtype=self.dtype, name="qkv")(x), x, side, deterministic)
        q, k, v = (p.reshape(bw, n, h, hd) for p in parts)
        q = q * jnp.asarray(hd**-0.5, q.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        soft = jnp.promote_types(logits.dtype, jnp.float32)  # float32 (float64 in x64 parity checks)
        bias = table.astype(soft)[relative_position_index(self.window).reshape(-1)].reshape(n, n, h)
        logits = logits.astype(soft) + bias.transpose(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            logits = logits.reshape(bw // nw, nw, h, n, n) + jnp.asarray(mask, soft)[None, :, None]
            logits = logits.reshape(bw, h, n, n)
        weights = stable_softmax(logits).astype(self.dtype)
        weights = nn.Dropout(self.attention_dropout_rate)(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(bw, n, d)
        out = _with_side(self, nn.Dense(d, dtype=self.dtype, name="proj")(out), out, side, "o", deterministic)
        return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)


def _with_side(module: nn.Module, y: Array, x: Array, side: Mapping[str, Any], key: str, deterministic: bool) -> Array:
    """A frozen linear's output y = x K + b with the activation-form hooks `side[key]` (a low-rank
    `SidePath` on x, or a tuple of them: e.g. LoRA's q and v paths on the fused qkv layer, each with
    its own input-dropout mask) and `side[key + "_ssf"]` (SSF's `ScaleShift` on the output)."""
    paths = side.get(key)
    outs = [_side(module, p, x, deterministic) for p in (paths if isinstance(paths, tuple) else (paths,))
            if p is not None]
    extra = sum(outs[1:], outs[0]) if outs else None
    return _scale_shift(y if extra is None else y + extra, side.get(f"{key}_ssf"))


def _qkv_with_side(module: nn.Module, y: Array, x: Array, side: Mapping[str, Any],
                   deterministic: bool) -> tuple[Array, Array, Array]:
    """The fused qkv output y (..., 3D) with its hooks, as its q, k, v parts (..., D) each.

    Each side path is added to the parts it covers, never as a (..., 3D) sum: every consumer of a
    part (the attention products read q, k and v in two layouts each) then reads y and that part's
    (..., D) term, not y and a whole 3D-wide side output (Swin-B at batch 8: 0.24 GB of a LoRA train
    step's traffic, 2.8 GB of a FacT-TT step's). A full-width path is split into its three column
    blocks; a slice path (`SidePath.columns`: LoRA's separate q or v) is added to its part."""
    d = y.shape[-1] // 3
    parts = [y[..., j * d:(j + 1) * d] for j in range(3)]
    paths = side.get("qkv")
    for path in paths if isinstance(paths, tuple) else (paths,):
        if path is None:
            continue
        if path.columns is None:
            terms = _side(module, path, x, deterministic, split=3)
        else:
            offset, _ = path.columns
            term = _side(module, dataclasses.replace(path, columns=None), x, deterministic)
            if offset % d == 0 and term.shape[-1] == d:  # exactly one part
                terms = [term if j == offset // d else None for j in range(3)]
            else:  # any other column range: placed, then cut (the pad and slices fuse into the adds)
                placed = _place_columns(term, path.columns)
                terms = [placed[..., j * d:(j + 1) * d] for j in range(3)]
        parts = [p if t is None else p + t for p, t in zip(parts, terms)]
    ss = side.get("qkv_ssf")
    return tuple(_scale_shift(p, ss, j * d) for j, p in enumerate(parts))


class Mlp(nn.Module):
    hidden: int
    gelu: str = "exact"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool, side: Mapping[str, Any] | None = None) -> Array:
        side = side or {}
        h = _with_side(self, nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x), x, side, "fc1", deterministic)
        h = nn.Dropout(self.dropout_rate)(_gelu(h, self.gelu), deterministic=deterministic)
        y = _with_side(self, nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h), h, side, "fc2", deterministic)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class SwinBlock(nn.Module):
    """(B, R², D) -> (B, R², D): (shifted-)window attention and MLP, each pre-norm and residual."""

    config: SwinConfig
    stage: int
    shift: int
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x: Array, deterministic: bool, side: Mapping[str, Any] | None = None) -> Array:
        c = self.config
        dt = jnp.dtype(c.dtype)
        b, t, d = x.shape
        r, w, s = c.stage_resolution(self.stage), c.stage_window(self.stage), self.shift
        y = _norm("norm1", dt)(x).reshape(b, r, r, d)
        if s:
            y = jnp.roll(y, (-s, -s), axis=(1, 2))
        y = WindowAttention(c.num_heads[self.stage], w, c.dropout_rate, c.attention_dropout_rate, dt,
                            name="attn")(window_partition(y, w), shift_mask(r, w, s) if s else None,
                                         deterministic, side)
        y = window_reverse(y, w, r, r)
        if s:
            y = jnp.roll(y, (s, s), axis=(1, 2))
        x = x + DropPath(self.drop_path, c.drop_path_mode)(y.reshape(b, t, d), deterministic)
        y = Mlp(int(d * c.mlp_ratio), c.gelu, c.dropout_rate, dt, name="mlp")(_norm("norm2", dt)(x),
                                                                               deterministic, side)
        return x + DropPath(self.drop_path, c.drop_path_mode)(y, deterministic)


class PatchMerging(nn.Module):
    """(B, R², D) -> (B, (R/2)², 2D): 2x2 neighbours concatenated, LayerNorm(4D), bias-free 4D -> 2D."""

    resolution: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, _, d = x.shape
        r = self.resolution
        x = x.reshape(b, r, r, d)
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = _norm("norm", self.dtype)(x.reshape(b, (r // 2) ** 2, 4 * d))
        return _Reduction(2 * d, self.dtype, name="reduction")(x)


class _Reduction(nn.Module):
    """The merging's bias-free Linear; a `bias` leaf is used when the tree has one (RLRR's Swin
    variant gives the reduction a bias shift, which stays in its merged tree)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.has_variable("params", "bias"):
            y = y + self.get_variable("params", "bias").astype(self.dtype)
        return y


class PatchEmbed(nn.Module):
    config: SwinConfig

    @nn.compact
    def __call__(self, images: Array) -> Array:
        c = self.config
        dt = jnp.dtype(c.dtype)
        p = c.patch_size
        x = nn.Conv(c.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=dt, name="proj")(images)
        b, h, w, d = x.shape
        return _norm("norm", dt)(x.reshape(b, h * w, d))


class SwinStage(nn.Module):
    config: SwinConfig
    stage: int
    rates: tuple[float, ...]

    @nn.compact
    def __call__(self, x: Array, deterministic: bool, side: Mapping[int, Any] | None = None) -> Array:
        c = self.config
        block = nn.remat(SwinBlock, static_argnums=(2,)) if c.remat else SwinBlock
        first = sum(c.depths[:self.stage])  # global index of the stage's first block (the side keys)
        for j, rate in enumerate(self.rates):
            shift = c.stage_shift(self.stage) if j % 2 else 0
            x = block(c, self.stage, shift, rate, name=f"blocks_{j}")(x, deterministic, (side or {}).get(first + j))
        if self.stage < c.num_stages - 1:
            x = PatchMerging(c.stage_resolution(self.stage), jnp.dtype(c.dtype), name="downsample")(x)
        return x


class Swin(nn.Module):
    """Swin Transformer. `__call__(images (B, H, W, 3), train=False) -> logits (B, C)`; with
    `return_features=True`, `(logits, features)` where features (B, D_last) are the pooled tokens.
    `side` (optional): activation-form hooks `{block: {"qkv"|"o"|"fc1"|"fc2": SidePath,
    "<key>_ssf": ScaleShift}}`, blocks numbered across stages (`jax_peft.activation_form` builds them)."""

    config: SwinConfig

    @nn.compact
    def __call__(self, images: Array, train: bool = False, return_features: bool = False,
                 side: Mapping[int, Any] | None = None):
        c = self.config
        unknown = sorted(set(side or {}) - set(range(c.num_layers)))
        if unknown:
            raise ValueError(f"side paths for blocks {unknown}, but this Swin has blocks 0..{c.num_layers - 1} "
                             "(numbered across stages); build them with jax_peft.activation_form for these params")
        dt = jnp.dtype(c.dtype)
        if images.shape[1:3] != (c.image_size, c.image_size):
            raise ValueError(f"the Swin config expects {c.image_size}x{c.image_size} images, got "
                             f"{images.shape[1]}x{images.shape[2]}; build the config with "
                             f"swin_config(..., image_size={images.shape[1]}) (windows and bias tables "
                             "depend on it)")
        x = PatchEmbed(c, name="patch_embed")(images.astype(dt))
        x = nn.Dropout(c.dropout_rate)(x, deterministic=not train)
        # linear drop-path schedule over all blocks, p_l = rate * l / (L - 1), as timm
        rates = [c.drop_path_rate * i / max(c.num_layers - 1, 1) for i in range(c.num_layers)]
        start = 0
        for i, depth in enumerate(c.depths):
            x = SwinStage(c, i, tuple(rates[start:start + depth]), name=f"layers_{i}")(x, not train, side)
            start += depth
        x = _norm("norm", dt)(x).mean(axis=1)
        logits = nn.Dense(c.num_classes, dtype=dt, name="head", kernel_init=nn.initializers.zeros)(x)
        out = jnp.promote_types(logits.dtype, jnp.float32)  # float32, or float64 in x64 parity checks
        logits = logits.astype(out)
        return (logits, x.astype(out)) if return_features else logits


def init_params(config: SwinConfig, rng: Array | int = 0) -> dict:
    """Randomly initialized canonical tree for `config` (float32)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    return jax.jit(lambda r: Swin(config).init(r, x, train=False)["params"])(rng)


def param_shapes(config: SwinConfig) -> dict:
    """The parameter tree of `config` as `jax.ShapeDtypeStruct`s, without allocating anything."""
    x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    return jax.eval_shape(lambda r, x: Swin(config).init(r, x, train=False)["params"],
                          jax.random.PRNGKey(0), x)


def is_swin_params(params: Mapping[str, Any]) -> bool:
    """True for a canonical Swin tree (has patch_embed and layers_0)."""
    return isinstance(params, Mapping) and "patch_embed" in params and "layers_0" in params


def swin_sites(params: Mapping[str, Any]) -> list:
    """Sites (`jax_peft.sites.Site`) of a canonical Swin tree, in forward order: "patch" (the conv),
    "patch_norm"; per stage i and block j (global block index g, stage i) "stage{i}/block{j}/ln1"
    (norm1), "qkv" (the fused projection, its own kernel (D, 3D), columns q | k | v), the slice sites
    "q", "k", "v" (its column thirds; virtual nodes `.../attn/{q,k,v}`), "o" (proj),
    "ln2", "fc1", "fc2"; per merging "stage{i}/merge" (the reduction, bias-free unless the tree has
    one; the merging's LayerNorm is not a site, as no official method adapts it, so the generic
    stem/final-norm rules of SSF give its official Swin placements); "final_norm". The qkv, o, fc1
    and fc2 sites have activation-form hooks (`Swin(side=...)`); edits elsewhere fold into the weights."""
    from jax_peft.sites import Site

    def shape(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in np.shape(_get(params, path)))

    def norm(name: str, node: str, block: int | None, stage: int | None) -> Site:
        d = shape(f"{node}/scale")[-1]
        return Site(name, "norm", node, f"{node}/scale", f"{node}/bias", d, d, block=block, stage=stage)

    def linear(name: str, kind: str, node: str, block: int | None, stage: int) -> Site:
        k = shape(f"{node}/kernel")
        bias = f"{node}/bias" if "bias" in _get(params, node) else None
        hook = (block, kind) if block is not None else None  # Swin's side keys: qkv, o, fc1, fc2
        return Site(name, kind, node, f"{node}/kernel", bias, int(np.prod(k[:-1])), k[-1], block=block, stage=stage,
                    hook=hook)

    out = [dataclasses.replace(linear("patch", "patch", "patch_embed/proj", None, 0), stage=None),
           norm("patch_norm", "patch_embed/norm", None, None)]
    stages = sorted((k for k in params if re.fullmatch(r"layers_\d+", k)), key=lambda k: int(k[7:]))
    g = 0
    for i, st in enumerate(stages):
        blocks = sorted((k for k in params[st] if re.fullmatch(r"blocks_\d+", k)), key=lambda k: int(k[7:]))
        for j, blk in enumerate(blocks):
            b, pre = f"{st}/{blk}", f"stage{i}/block{j}"
            qkv = linear(f"{pre}/qkv", "qkv", f"{b}/attn/qkv", g, i)
            d = qkv.d_out // 3
            out += [norm(f"{pre}/ln1", f"{b}/norm1", g, i), qkv]
            out += [Site(f"{pre}/{m}", m, f"{b}/attn/{m}", None, None, qkv.d_in, d, block=g, stage=i,
                         parent=qkv.name, offset=n * d) for n, m in enumerate("qkv")]
            out += [linear(f"{pre}/o", "o", f"{b}/attn/proj", g, i), norm(f"{pre}/ln2", f"{b}/norm2", g, i),
                    linear(f"{pre}/fc1", "fc1", f"{b}/mlp/fc1", g, i), linear(f"{pre}/fc2", "fc2", f"{b}/mlp/fc2", g, i)]
            g += 1
        if "downsample" in params[st]:  # its norm is not a site: no method adapts it
            out.append(linear(f"stage{i}/merge", "merge", f"{st}/downsample/reduction", None, i))
    out.append(norm("final_norm", "norm", None, None))
    return out


def _get(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("/"):
        node = node[part]
    return node


# checkpoint conversion lives in jax_peft.swin_checkpoint (it imports this module); offered here too
_CHECKPOINT_NAMES = ("from_state_dict", "to_state_dict", "adapt_to_config", "resize_bias_table",
                     "validate_params", "load")


def __getattr__(name: str) -> Any:
    if name in _CHECKPOINT_NAMES:
        from jax_peft import swin_checkpoint

        return getattr(swin_checkpoint, name)
    raise AttributeError(f"module 'jax_peft.swin' has no attribute {name!r}")
