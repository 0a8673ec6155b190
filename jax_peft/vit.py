"""A Flax (linen) Vision Transformer whose parameter tree is the Google checkpoint's tree.

Canonical parameter tree (Linen names; `load_checkpoint` normalizes the pre-Linen names of the
original files to these), for width D, MLP width M, H heads of hd = D / H, patch P, depth L,
C classes and N patch tokens::

    cls                                                     (1, 1, D)     classifier="token" only
    embedding/{kernel (P, P, 3, D), bias (D,)}
    Transformer/posembed_input/pos_embedding                (1, N + 1, D) (N rows for "gap", "map")
    Transformer/encoderblock_{i}/LayerNorm_0/{scale, bias}                (D,)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}/kernel (D, H, hd)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}/bias   (H, hd)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/out/{kernel (H, hd, D), bias (D,)}
    Transformer/encoderblock_{i}/LayerNorm_1/{scale, bias}                (D,)
    Transformer/encoderblock_{i}/MlpBlock_0/Dense_0/{kernel (D, M), bias (M,)}
    Transformer/encoderblock_{i}/MlpBlock_0/Dense_1/{kernel (M, D), bias (D,)}
    Transformer/encoder_norm/{scale, bias}                                (D,)
    MAPHead_0/probe                                         (1, 1, D)     classifier="map" only
    MAPHead_0/MultiHeadDotProductAttention_0/...            as in a block (probe queries the tokens)
    MAPHead_0/LayerNorm_0/{scale, bias}, MAPHead_0/MlpBlock_0/Dense_{0,1}/...   as in a block
    pre_logits/{kernel (D, D), bias (D,)}                   only with representation_size
    head/{kernel (D, C), bias (C,)}

Images are NHWC floats (normally in [-1, 1]); `model.apply({"params": p}, x, train=False)` gives
logits (B, C). LayerNorm eps is 1e-6 everywhere, as in vit_jax and the PEFT codebases.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jax_peft.dropout import inverted_dropout, keep_mask
from jax_peft.scan import STACKED  # the scanned encoder's parameter scope

Array = jax.Array
LN_EPS = 1e-6

# name -> (patch, width, depth, heads, mlp_dim)
NAMED_CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "ViT-Ti/16": (16, 192, 12, 3, 768),
    "ViT-S/16": (16, 384, 12, 6, 1536),
    "ViT-S/32": (32, 384, 12, 6, 1536),
    "ViT-B/8": (8, 768, 12, 12, 3072),
    "ViT-B/16": (16, 768, 12, 12, 3072),
    "ViT-B/32": (32, 768, 12, 12, 3072),
    "ViT-L/16": (16, 1024, 24, 16, 4096),
    "ViT-L/32": (32, 1024, 24, 16, 4096),
    "ViT-H/14": (14, 1280, 32, 16, 5120),
    # Scaling-ViT shapes (Zhai et al. 2022, Table 2; big_vision's variant table "g" and "G"):
    "ViT-g/14": (14, 1408, 40, 16, 6144),
    "ViT-G/14": (14, 1664, 48, 16, 8192),
    # SigLIP image towers (big_vision variants "So400m" and "g-opt", the SigLIP 2 g/16 tower):
    "ViT-So400m/14": (14, 1152, 27, 16, 4304),  # SigLIP's shape-optimized tower (big_vision)
    "ViT-g-opt/16": (16, 1536, 40, 16, 6144),
}
# Named models whose released weights differ from the ViT defaults: the SigLIP towers pool with a
# MAP head (no class token) and use tanh GELU, as big_vision trains them.
NAMED_DEFAULTS: dict[str, dict[str, Any]] = {
    "ViT-So400m/14": {"classifier": "map", "gelu": "tanh"},
    "ViT-g-opt/16": {"classifier": "map", "gelu": "tanh"},
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture and regularization of a ViT. All fields are plain Python values (hashable)."""

    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    image_size: int = 224
    # "token": CLS token after the final LN; "gap": mean of the tokens; "map": big_vision's MAP head
    # (a learned probe attends over the tokens, then LN + MLP with a residual; no CLS token).
    classifier: Literal["token", "gap", "map"] = "token"
    representation_size: int | None = None
    gelu: Literal["exact", "tanh"] = "exact"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    # "sample": timm stochastic depth (FacT, EFFT, SSF); "element": RLRR's element-wise dropout.
    drop_path_mode: Literal["sample", "element"] = "sample"
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False  # rematerialize each block in the backward pass
    # One lax.scan over the blocks (params `Transformer/encoderblock/...` stacked on a leading depth
    # axis, see jax_peft.scan): compiles one block instead of L.
    scan: bool = False
    name: str = "custom"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "choose heads that divide the width (e.g. width 768 with 12 heads)."
            )
        if self.classifier not in ("token", "gap", "map"):
            raise ValueError(f"classifier must be 'token', 'gap' or 'map', got {self.classifier!r}")
        if self.gelu not in ("exact", "tanh"):
            raise ValueError(f"gelu must be 'exact' or 'tanh', got {self.gelu!r}")
        if self.drop_path_mode not in ("sample", "element"):
            raise ValueError(f"drop_path_mode must be 'sample' or 'element', got {self.drop_path_mode!r}")
        _check_image_size(self.image_size, self.patch_size)
        _check_dtype(self.dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16"}


def _check_image_size(image_size: int, patch_size: int) -> None:
    """Refuses an input size the patches do not tile (its last rows and columns would be dropped)."""
    if patch_size < 1 or image_size < 1:
        raise ValueError(f"image_size ({image_size}) and patch_size ({patch_size}) must be positive")
    if image_size % patch_size:
        lo = max(image_size // patch_size, 1) * patch_size
        hi = (image_size // patch_size + 1) * patch_size
        near = f"{lo} or {hi}" if lo < image_size else f"{hi}"
        raise ValueError(
            f"image_size {image_size} is not divisible by patch_size {patch_size}: the last "
            f"{image_size % patch_size} rows and columns would never reach the model. Use image_size "
            f"{near} (and resize the images to it, e.g. config.data.image_size in training)")


def _check_dtype(dtype: Any) -> None:
    """The compute dtype must be a floating dtype name that `jnp.dtype` understands."""
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        hint = _DTYPE_ALIASES.get(str(dtype).lower())
        fix = f"use dtype={hint!r}" if hint else "use 'float32' or 'bfloat16'"
        raise ValueError(f"dtype {dtype!r} is not a floating dtype jax understands; {fix}")


def check_images(config: ViTConfig, images: Any) -> None:
    """Refuses model input that is not (B, image_size, image_size, 3) channels-last, naming the
    expected shape (wrong channel count, NCHW layout, other size, missing batch axis)."""
    shape = tuple(jnp.shape(images))
    s = config.image_size
    if len(shape) == 4 and shape[1:] == (s, s, 3):
        return
    want = f"(B, {s}, {s}, 3) (batch, height, width, RGB channels last; config image_size {s})"
    if len(shape) == 3 and shape == (s, s, 3):
        fix = "add the batch axis: images[None]"
    elif len(shape) == 4 and shape[1] == 3 and shape[2:] == (s, s):
        fix = "the input is channels-first (NCHW): transpose it with images.transpose(0, 2, 3, 1)"
    elif len(shape) == 4 and shape[1:3] == (s, s):
        fix = f"the images have {shape[3]} channels: convert them to RGB (3 channels)"
    elif len(shape) == 4 and shape[-1] == 3:
        fix = (f"resize the images to {s}x{s}, or build the model for {shape[1]}x{shape[2]} with "
               f"vit_config(..., image_size=...) (square images whose size the patch size {config.patch_size} divides)")
    else:
        fix = "pass a batch of RGB images channels-last"
    raise ValueError(f"ViT input has shape {shape}, expected {want}; {fix}")


def _canonical_name(name: str) -> str:
    """'ViT-B_16', 'vit-b/16', 'B/16', 'B_16' -> 'ViT-B/16'; 'So400m/14' -> 'ViT-So400m/14'. The case
    of g and G is kept: ViT-g/14 and ViT-G/14 are different models ('g-opt/16': SigLIP 2's g tower)."""
    m = re.fullmatch(r"(?:[vV][iI][tT][-_]?)?([tT][iI]|[sS][oO]400[mM]|g-opt|[sSbBlLhH]|g|G)[-_/]?(\d+)",
                     name.strip())
    if not m:
        return name
    size = m.group(1)
    size = {"ti": "Ti", "so400m": "So400m"}.get(size.lower(), size if size in ("g", "G", "g-opt") else size.upper())
    return f"ViT-{size}/{m.group(2)}"


def vit_config(
    name_or_params: str | Mapping[str, Any] | None = "ViT-B/16",
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    **overrides: Any,
) -> ViTConfig:
    """Builds a `ViTConfig` from a model name or from a loaded parameter tree.

    Args:
      name_or_params: a name such as "ViT-B/16" (also "ViT-B_16", "B/16"), or a canonical parameter
        tree, from which patch, width, depth, heads, MLP width, classes, image size, classifier and
        `representation_size` are inferred.
      num_classes: number of classes (default: 1000 for names, the head's size for trees).
      image_size: input resolution (default 224 for names; for trees, from the position embedding).
      **overrides: any other `ViTConfig` field (gelu="tanh", dropout_rate=..., custom widths ...).
    """
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown ViT config option(s) {unknown}; valid options: {sorted(fields)}")
    if name_or_params is None:
        base = ViTConfig()
    elif isinstance(name_or_params, str):
        canon = _canonical_name(name_or_params)
        if canon not in NAMED_CONFIGS:
            raise ValueError(
                f"unknown model name {name_or_params!r}; known: {sorted(NAMED_CONFIGS)}. "
                "For a custom size pass None and set patch_size, hidden_size, num_layers, num_heads, mlp_dim."
            )
        p, d, l, h, m = NAMED_CONFIGS[canon]
        base = ViTConfig(patch_size=p, hidden_size=d, num_layers=l, num_heads=h, mlp_dim=m, name=canon,
                         **NAMED_DEFAULTS.get(canon, {}))
    else:
        base = infer_config(name_or_params)
    changes = dict(overrides)
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if image_size is not None:
        changes["image_size"] = image_size
    return dataclasses.replace(base, **changes)


def infer_config(params: Mapping[str, Any]) -> ViTConfig:
    """Infers the architecture of a canonical parameter tree (see module docstring); a stacked tree
    (`Transformer/encoderblock/...`, jax_peft.scan) gives a config with `scan=True`."""
    try:
        emb = params["embedding"]["kernel"]
        tr = params["Transformer"]
        scanned = STACKED in tr
        blocks = sorted(
            (k for k in tr if re.fullmatch(r"encoderblock_\d+", k)), key=lambda k: int(k.split("_")[1])
        )
        if not blocks and not scanned:
            raise KeyError("Transformer/encoderblock_0")
        blk = tr[STACKED] if scanned else tr[blocks[0]]
        q = blk["MultiHeadDotProductAttention_0"]["query"]["kernel"]
        mlp = blk["MlpBlock_0"]["Dense_0"]["kernel"]
        if scanned:  # leading depth axis
            depth, q, mlp = int(q.shape[0]), q[0], mlp[0]
        else:
            depth = len(blocks)
        pe = tr["posembed_input"]["pos_embedding"]
    except KeyError as e:
        raise ValueError(
            f"cannot infer the ViT architecture: the tree has no {e.args[0]!r}. Pass a tree from "
            "jax_peft.load_checkpoint (canonical Linen names) or give a model name instead."
        ) from None
    patch, width = int(emb.shape[0]), int(emb.shape[-1])
    heads = int(q.shape[1])
    classifier = "map" if "MAPHead_0" in params else "token" if "cls" in params else "gap"
    if classifier == "map" and "cls" in params:
        raise ValueError("the tree has both a class token ('cls') and a MAP head ('MAPHead_0'); big_vision "
                         "never combines them. Drop one of the two subtrees.")
    n_patches = int(pe.shape[1]) - (1 if classifier == "token" else 0)
    grid = int(round(n_patches**0.5))
    if grid * grid != n_patches:
        raise ValueError(f"position embedding has {n_patches} patch rows, not a square grid")
    num_classes = int(params["head"]["kernel"].shape[-1]) if "head" in params else 1000
    rep = int(params["pre_logits"]["kernel"].shape[-1]) if "pre_logits" in params else None
    name = "custom"
    for n, cfg in NAMED_CONFIGS.items():
        if cfg == (patch, width, depth, heads, int(mlp.shape[-1])):
            name = n
    return ViTConfig(
        patch_size=patch, hidden_size=width, num_layers=depth, num_heads=heads,
        mlp_dim=int(mlp.shape[-1]), num_classes=num_classes, image_size=grid * patch,
        classifier=classifier, representation_size=rep, name=name, scan=scanned,
    )


@flax.struct.dataclass
class SidePath:
    """A low-rank branch beside a frozen linear layer (the *activation form* of an increment).

    For input x (..., d_in) it adds `scale · drop(x F_0 … F_j) F_{j+1} … F_{k-1}` to the frozen
    output x K + b, where j = `dropout_after` (-1: dropout on the input x itself, as LoRA; k-2:
    dropout on the last rank-r activation, as FacT). Equal to the weight form `K + scale · F_0 … F_{k-1}`
    when dropout is off, without materializing the (d_in, d_out) increment or its gradient.

    A factor F (a, b) whose row count a is a proper divisor of the current width w = k·a acts on each
    of the k consecutive width-a chunks, i.e. as the block-diagonal kron(I_k, F) (k·a, k·b), without
    building it: FacT's chunked MLP paths, fc1 `(x U T1) → drop → kron(I_k, V)` and fc2
    `h kron(I_k, U) → T2 → drop → V`, are factors (U, T1, V) and (U, T2, V).

    `columns=(offset, width)` places the path's d_out output columns at [offset, offset + d_out) of
    a width-wide layer output, zero elsewhere (a path on a slice of a fused layer: the Swin's q or v
    inside its qkv). The path stays d_out wide; the zeros are only in the sum's index arithmetic.
    """

    factors: tuple
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)
    dropout_after: int = flax.struct.field(pytree_node=False, default=-1)
    columns: tuple[int, int] | None = flax.struct.field(pytree_node=False, default=None)

    def increment(self, d_in: int | None = None) -> Array:
        """The equivalent dense increment (d_in, d_out) (for tests and merging). `d_in` is needed
        only when the first factor is chunked (its rows divide d_in)."""
        if d_in is None:
            out, rest = self.factors[0], self.factors[1:]
        else:
            out, rest = jnp.eye(d_in, dtype=self.factors[0].dtype), self.factors
        for f in rest:
            out = _chunked_matmul(out, f)
        return _place_columns(self.scale * out, self.columns)


def _place_columns(y: Array, columns: tuple[int, int] | None) -> Array:
    """y (..., d) as columns [offset, offset + d) of a (..., width) array of zeros, for columns =
    (offset, width); y itself for None. A pad: inside the consumer's fusion it costs no traffic."""
    if columns is None:
        return y
    offset, width = columns
    d = y.shape[-1]
    if offset < 0 or offset + d > width:
        raise ValueError(f"SidePath columns {columns}: a {d}-wide output does not fit at offset {offset} "
                         f"of width {width}")
    return jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(offset, width - offset - d)])


@flax.struct.dataclass
class ScaleShift:
    """SSF's `y ⊙ γ + β` on a frozen linear layer's output y (the activation form of SSF): γ, β
    (d_out,). Keyed "<module>_ssf" in a block's side mapping ("qkv_ssf": (3D,) over q | k | v)."""

    scale: Array
    shift: Array


def _scale_shift(y: Array, ss: ScaleShift | None, start: int = 0) -> Array:
    """y (B, T, *out) ⊙ γ + β with γ, β[start:start + prod(out)] laid out over `out`."""
    if ss is None:
        return y
    out = y.shape[2:]
    n = math.prod(out)
    g, b = ss.scale[start:start + n].reshape(out), ss.shift[start:start + n].reshape(out)
    return y * g.astype(y.dtype) + b.astype(y.dtype)


# A chunked factor whose rank side (min of its rows and columns) is at most this is applied as the dense
# block-diagonal kron(I_k, F) instead of to h reshaped into (n·k, a) rows. The reshaped view makes XLA
# emit the element-wise producer of h twice, once per layout (the MLP's GELU output for FacT's fc2
# path, the fc1 sum and its gradient for the fc1 path): on ViT-B/16 that is ~0.2 GB of traffic per
# block. The block-diagonal product costs k times the chunk's FLOPs, negligible at rank ≤ 8
# (FacT-TT r8: +2.9 % of the floor's FLOPs) but not at rank 32 (FacT-TK r32: +12 %).
BLOCK_DIAGONAL_MAX_RANK = 8


def _chunked_matmul(h: Array, f: Array) -> Array:
    """h (n, w) @ f (a, b) for w = a, or, for w = k·a, f applied to each of h's k chunks: (n, k·b)."""
    w, a = h.shape[-1], f.shape[0]
    if w == a:
        return h @ f
    if w % a:
        raise ValueError(f"SidePath factor with {a} rows cannot act on width {w}: the rows must equal the "
                         f"width or divide it (block-diagonal chunks)")
    if min(f.shape) <= BLOCK_DIAGONAL_MAX_RANK:
        return h @ jnp.kron(jnp.eye(w // a, dtype=f.dtype), f)
    return (h.reshape(-1, a) @ f).reshape(h.shape[0], (w // a) * f.shape[1])


def _side(module: nn.Module, path: SidePath | None, x: Array, deterministic: bool,
          split: int = 1) -> Array | tuple[Array, ...] | None:
    """Evaluates a SidePath on x (..., d_in) -> (..., d_out), or None when there is no path.

    `split=k` returns the output as k column blocks (..., d_out / k) (the fused q | k | v path),
    each its own product with the last factor: no (n, d_out) output is formed, so the backward pass
    reads the k incoming gradients as they are instead of concatenating them first."""
    if path is None:
        return None

    def drop(h):
        if deterministic or path.dropout == 0.0:
            return h
        return inverted_dropout(module.make_rng("dropout"), h, path.dropout)

    # Tokens flattened to one axis: on XLA:CPU the (B, T, d) form made the factor gradients read
    # a transposed, recomputed copy of the incoming gradient (+45% per block for FacT's fc1 path).
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1])
    if path.dropout_after < 0:
        h = drop(h)
    *body, last = path.factors
    for j, f in enumerate(body):
        h = _chunked_matmul(h, f.astype(x.dtype))
        if j == path.dropout_after:
            h = drop(h)
    # the scale goes on the (small) last factor, not on the (n, d_out) output: one pass less
    last = last.astype(x.dtype) * jnp.asarray(path.scale, x.dtype)
    if path.dropout_after == len(path.factors) - 1:  # dropout on the output itself
        outs = jnp.split(drop(_chunked_matmul(h, last)), split, axis=-1)
    elif last.shape[0] * split == h.shape[-1]:  # chunked last factor: chunk j of h times it
        a = last.shape[0]
        outs = [h[:, j * a:(j + 1) * a] @ last for j in range(split)]
    else:  # column block j of the last factor
        outs = [_chunked_matmul(h, f) for f in jnp.split(last, split, axis=-1)]
    outs = tuple(o.reshape(lead + (o.shape[-1],)) for o in outs)
    if path.columns is not None:
        if split > 1:
            raise ValueError("a SidePath with columns= cannot also be split into column blocks")
        return _place_columns(outs[0], path.columns)
    return outs if split > 1 else outs[0]


@jax.custom_vjp
def stable_softmax(logits: Array) -> Array:
    """Softmax over the last axis whose backward pass stays accurate when a row saturates.

    The usual backward `p ⊙ (g − Σ_j p_j g_j)` cancels catastrophically when one p_m ≈ 1: the
    relative error grows like eps / (1 − p_m), which in float32 swamps the small attention
    gradients of trained or large-scale adapters. Using the row's dominant entry as reference,
    `p ⊙ ((g − g_m) − Σ_j p_j (g_j − g_m))` is the same quantity in exact arithmetic with no
    cancellation (the j = m term vanishes exactly). Costs a few element-wise ops per row.
    """
    return jax.nn.softmax(logits, axis=-1)


def _stable_softmax_fwd(logits: Array):
    p = jax.nn.softmax(logits, axis=-1)
    return p, p


def _stable_softmax_bwd(p: Array, g: Array):
    m = jnp.argmax(p, axis=-1, keepdims=True)
    delta = g - jnp.take_along_axis(g, m, axis=-1)
    return (p * (delta - jnp.sum(p * delta, axis=-1, keepdims=True)),)


stable_softmax.defvjp(_stable_softmax_fwd, _stable_softmax_bwd)


def _gelu(x: Array, kind: str) -> Array:
    return nn.gelu(x, approximate=(kind == "tanh"))


class DropPath(nn.Module):
    """Residual-branch dropout: per-sample (timm stochastic depth) or element-wise (RLRR)."""

    rate: float
    mode: str = "sample"

    @nn.compact
    def __call__(self, x: Array, deterministic: bool, rate: Array | None = None) -> Array:
        """`rate` (a traced scalar) overrides the attribute: the scanned encoder's per-block rate."""
        if deterministic or (rate is None and self.rate == 0.0):
            return x
        keep = 1.0 - (self.rate if rate is None else rate)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1) if self.mode == "sample" else x.shape
        mask = keep_mask(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Attention(nn.Module):
    """Multi-head self-attention with Google's parameter layout (query/key/value/out DenseGeneral)."""

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool, side: Mapping[str, SidePath] | None = None,
                 kv: Array | None = None) -> Array:
        """x (B, T, D) -> (B, T, D). `kv` (B, S, D): keys and values come from it instead of x
        (cross-attention: the MAP head's probe queries the tokens)."""
        d = x.shape[-1]
        hd = d // self.num_heads
        side = side or {}
        src = x if kv is None else kv
        if kv is not None and "qkv" in side:
            raise ValueError("a fused 'qkv' side path needs one input for q, k and v; cross-attention "
                             "(kv=...) takes separate 'q', 'k', 'v' paths")
        # "qkv": one path for the fused projection (..., 3D), columns q | k | v: one input dropout
        # mask shared by q, k and v, as NOAH's LoRA on timm's fused qkv.
        fused = _side(self, side.get("qkv"), x, deterministic, split=3) or (None,) * 3

        def proj(name: str, short: str, j: int, inp: Array) -> Array:
            y = nn.DenseGeneral((self.num_heads, hd), dtype=self.dtype, name=name)(inp)  # (B, T, H, hd)
            for extra in (_side(self, side.get(short), inp, deterministic), fused[j]):
                y = y if extra is None else y + extra.reshape(y.shape)
            y = _scale_shift(y, side.get(f"{short}_ssf"))  # output scale/shift of this projection
            return _scale_shift(y, side.get("qkv_ssf"), j * d)  # SSF on the fused qkv output

        q, k, v = proj("query", "q", 0, x), proj("key", "k", 1, src), proj("value", "v", 2, src)
        q = q / jnp.sqrt(hd).astype(q.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        soft = jnp.promote_types(logits.dtype, jnp.float32)  # float32 (float64 in x64 parity checks)
        weights = stable_softmax(logits.astype(soft)).astype(self.dtype)
        if not deterministic and self.dropout_rate > 0:
            weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        y = nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, name="out")(out)
        extra = _side(self, side.get("o"), out.reshape(out.shape[:-2] + (d,)), deterministic)
        return _scale_shift(y if extra is None else y + extra, side.get("o_ssf"))


class MlpBlock(nn.Module):
    mlp_dim: int
    gelu: str = "exact"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool, side: Mapping[str, SidePath] | None = None) -> Array:
        d = x.shape[-1]
        side = side or {}
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x)
        extra = _side(self, side.get("fc1"), x, deterministic)
        h = _scale_shift(h if extra is None else h + extra, side.get("fc1_ssf"))
        h = _gelu(h, self.gelu)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        y = nn.Dense(d, dtype=self.dtype, name="Dense_1")(h)
        extra = _side(self, side.get("fc2"), h, deterministic)
        h = _scale_shift(y if extra is None else y + extra, side.get("fc2_ssf"))
        return nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
    """Pre-norm block: x + MHA(LN_0(x)), then x + MLP(LN_1(x))."""

    config: ViTConfig
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x: Array, deterministic: bool, side: Mapping[str, SidePath] | None = None,
                 drop_rate: Array | None = None) -> Array:
        """x (B, T, D) -> (B, T, D). `drop_rate` (traced) replaces `drop_path` in the scanned encoder."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        y = nn.LayerNorm(epsilon=LN_EPS, dtype=dt, name="LayerNorm_0")(x)
        y = Attention(c.num_heads, c.attention_dropout_rate, dt, name="MultiHeadDotProductAttention_0")(
            y, deterministic, side
        )
        y = nn.Dropout(c.dropout_rate)(y, deterministic=deterministic)
        x = x + DropPath(self.drop_path, c.drop_path_mode)(y, deterministic, drop_rate)
        y = nn.LayerNorm(epsilon=LN_EPS, dtype=dt, name="LayerNorm_1")(x)
        y = MlpBlock(c.mlp_dim, c.gelu, c.dropout_rate, dt, name="MlpBlock_0")(y, deterministic, side)
        return x + DropPath(self.drop_path, c.drop_path_mode)(y, deterministic, drop_rate)


class MAPHead(nn.Module):
    """Multihead attention pooling as big_vision's `MAPHead` (pool_type="map"): a learned probe
    (1, 1, D) attends over the tokens (probe as query, tokens as keys and values), then
    `y + MLP(LN(y))`; returns the probe's row (B, D). The MLP width is the encoder's (`mlp_dim`)
    and it uses the config's GELU (big_vision: tanh). Parameters: `probe`,
    `MultiHeadDotProductAttention_0`, `LayerNorm_0`, `MlpBlock_0`, laid out as in an encoder block.

    Adapter sites (off by default; methods address the encoder blocks): the head's query/key/value/out
    and Dense_0/Dense_1 are linears with a block's layouts, so a site table can expose them under
    `MAPHead_0/...` with the block's short names (q, k, v, o, fc1, fc2); activation-form paths would
    use separate q/k/v paths (the probe and the tokens are different inputs, so no fused qkv)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        c = self.config
        dt = jnp.dtype(c.dtype)
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
        y = jnp.tile(probe.astype(dt), (x.shape[0], 1, 1))
        y = Attention(c.num_heads, 0.0, dt, name="MultiHeadDotProductAttention_0")(y, deterministic, kv=x)
        h = nn.LayerNorm(epsilon=LN_EPS, dtype=dt, name="LayerNorm_0")(y)
        y = y + MlpBlock(c.mlp_dim, c.gelu, 0.0, dt, name="MlpBlock_0")(h, deterministic)
        return y[:, 0]


class AddPositionEmbs(nn.Module):
    @nn.compact
    def __call__(self, x: Array) -> Array:
        pe = self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
        return x + pe.astype(x.dtype)


def stack_side_paths(side: Mapping[int, Mapping[str, SidePath]], depth: int) -> dict[str, SidePath]:
    """`{block: {module: SidePath}}` -> `{module: SidePath}` with factors stacked on a leading depth
    axis: the per-block inputs of the scanned encoder. Every block needs the same paths and shapes."""
    missing = [i for i in range(depth) if i not in side]
    extra = sorted(set(side) - set(range(depth)))
    if missing or extra:
        raise ValueError(f"a scanned ViT (config.scan=True) needs side paths for every block 0..{depth - 1}; "
                         f"missing {missing}, unknown {extra}. Use config.scan=False for per-block paths")
    trees = [jax.tree_util.tree_structure(side[i]) for i in range(depth)]
    if any(t != trees[0] for t in trees):
        raise ValueError("a scanned ViT needs the same side paths (modules, scale, dropout) in every block; "
                         "use config.scan=False otherwise")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[side[i] for i in range(depth)])


def _scan_blocks(block_cls: Any, c: ViTConfig, x: Array, deterministic: bool, rates: list[float],
                 side: Mapping[int, Any]) -> Array:
    """The encoder blocks as one `nn.scan` (parameters `Transformer/encoderblock/...` with a leading
    depth axis, the layout of `jax_peft.scan.stack_blocks`): one block body compiled instead of L.
    Per-block drop-path rates and side paths are scanned inputs; dropout keys differ per block."""
    stacked = stack_side_paths(side, c.num_layers) if side else None

    def body(block: nn.Module, carry: Array, xs: tuple) -> tuple[Array, None]:
        rate, paths = xs
        return block(carry, deterministic, paths, rate if c.drop_path_rate > 0 else None), None

    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   length=c.num_layers)
    x, _ = scan(block_cls(c, 0.0, name=STACKED), x, (jnp.asarray(rates, jnp.float32), stacked))
    return x


class Encoder(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool, side: Mapping[int, Any] | None = None) -> Array:
        c = self.config
        side = side or {}
        x = AddPositionEmbs(name="posembed_input")(x)
        x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
        block_cls = nn.remat(Encoder1DBlock, static_argnums=(2,)) if c.remat else Encoder1DBlock
        # Linear drop-path schedule p_l = rate * l / (L - 1), as timm and RLRR.
        rates = [c.drop_path_rate * i / max(c.num_layers - 1, 1) for i in range(c.num_layers)]
        if c.scan:
            x = _scan_blocks(block_cls, c, x, deterministic, rates, side)
        else:
            for i in range(c.num_layers):
                x = block_cls(c, rates[i], name=f"encoderblock_{i}")(x, deterministic, side.get(i))
        return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.dtype(c.dtype), name="encoder_norm")(x)


class ViT(nn.Module):
    """Vision Transformer. `__call__(images (B, H, W, 3), train=False) -> logits (B, C)`.

    With `return_features=True` returns `(logits, features)`, where features (B, D) are the
    pooled representation fed to the head (after `pre_logits` when present).

    `side` (optional) adds activation-form low-rank branches: `{block_index: {"q"|"k"|"v"|"o"|
    "fc1"|"fc2"|"qkv": SidePath}}`, evaluated beside the frozen kernels (see `SidePath`); "qkv" is
    one path of width 3D for the fused projection (columns q | k | v, one dropout mask). Entries
    "<key>_ssf" for any of those keys: `ScaleShift` scale and shift a linear's output (SSF).
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images: Array, train: bool = False, return_features: bool = False,
                 side: Mapping[int, Mapping[str, SidePath]] | None = None):
        c = self.config
        check_images(c, images)
        dt = jnp.dtype(c.dtype)
        x = images.astype(dt)
        x = nn.Conv(
            c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
            padding="VALID", dtype=dt, name="embedding",
        )(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        if c.classifier == "token":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
            x = jnp.concatenate([jnp.tile(cls.astype(dt), (b, 1, 1)), x], axis=1)
        x = Encoder(c, name="Transformer")(x, not train, side)
        if c.classifier == "map":
            x = MAPHead(c, name="MAPHead_0")(x, not train)
        else:
            x = x[:, 0] if c.classifier == "token" else x.mean(axis=1)
        if c.representation_size is not None:
            x = jnp.tanh(nn.Dense(c.representation_size, dtype=dt, name="pre_logits")(x))
        logits = nn.Dense(
            c.num_classes, dtype=dt, name="head", kernel_init=nn.initializers.zeros
        )(x)
        out = jnp.promote_types(logits.dtype, jnp.float32)  # float32, or float64 in x64 parity checks
        logits = logits.astype(out)
        return (logits, x.astype(out)) if return_features else logits


def init_params(config: ViTConfig, rng: Array | int = 0) -> dict:
    """Randomly initialized canonical parameter tree for `config` (float32)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    return jax.jit(lambda r: ViT(config).init(r, x, train=False)["params"])(rng)


def param_shapes(config: ViTConfig) -> dict:
    """The parameter tree of `config` as `jax.ShapeDtypeStruct`s, without allocating anything."""
    x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    return jax.eval_shape(lambda r, x: ViT(config).init(r, x, train=False)["params"],
                          jax.random.PRNGKey(0), x)
