"""Google ViT `.npz` checkpoints: load (any layout) to the canonical tree, save, validate, adapt.

Layouts read (checkpoints.md sections 4-5), all normalized to the canonical Linen tree documented
in `jax_peft.vit`:

    pre-Linen        original files (imagenet21k, AugReg, SAM): MultiHeadDotProductAttention_1,
                     LayerNorm_2, MlpBlock_3 inside each block -> renumbered per prefix
    Linen            files written by current vit_jax: already canonical
    big_vision       `params/` (or `params/img/`) prefix, top-level `pos_embedding` without the
                     CLS slot (a zero CLS row is added, which preserves the function)
    big_vision-scan  `Transformer/encoderblock/...` arrays with a leading depth axis (sliced per block)

Two-tower files (SigLIP, LiT): the image tower `params/img/` is taken and the rest (text tower,
logit temperature and bias) dropped with a warning. A MAP head (`MAPHead_0`, or the inlined `probe`
of early big_vision files) loads as is: `vit_config(params)` then gives classifier="map".
timm state dicts (`.safetensors`, `.pth`, `hf-hub:timm/...`) go through `jax_peft.timm_vit`.

An `opt/target/` prefix (Flax optimizer state) is stripped; bfloat16 stored as raw 2-byte void
(`|V2`) is decoded; hybrid GroupNorm scale/bias of shape (1, 1, 1, C) are squeezed to (C,).

`load_checkpoint` returns numpy float32 arrays (host memory; jax moves them on first use). With
`lazy=True` it returns `jax_peft.lazy_npz.LazyArray`s instead (nothing read until used: each leaf is
a memory map of the file, cast as it is read), and with `sharding=` the arrays are placed on devices
leaf by leaf, each device reading only its own slice from the file, so the host never holds the tree.
`save_checkpoint` writes the original pre-Linen layout, which both vit_jax and timm's npz loader read
(`layout="big_vision"`: big_vision's; a `.safetensors` path: a timm state dict).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jax_peft import lazy_npz, paths
from jax_peft.download import check_zip, fetch, public_mode
from jax_peft.lazy_npz import CheckpointError, LazyArray
from jax_peft.vit import ViTConfig, param_shapes, vit_config

Tree = Mapping[str, Any]

PREFIXES = ("opt/target/", "params/img/", "params/")
LAYOUTS = ("pre-Linen", "Linen", "big_vision", "big_vision-scan")
# Children of an encoder block: Linen name <-> pre-Linen name (one counter for all children).
_TO_PRE_LINEN = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                 "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
_NUMBERED = re.compile(r"(.+)_(\d+)")
# Top-level names of a MAP head stored inline (early big_vision files), moved under MAPHead_0.
_INLINED_MAP = ("probe", "MlpBlock_0", "MultiHeadDotProductAttention_0", "LayerNorm_0")
# Prefixes whose indices are kept as stored (a missing block is then reported by its own index).
_KEEP_INDEX = ("encoderblock",)


# ----------------------------------------------------------------------------------------- reading


def _decode(arr: np.ndarray) -> np.ndarray:
    """bfloat16 stored as raw 2-byte void (`|V2`) -> bfloat16; everything else unchanged."""
    if arr.dtype.kind == "V" and arr.dtype.itemsize == 2 and arr.dtype.names is None:
        import ml_dtypes

        return arr.view(ml_dtypes.bfloat16)
    return arr


def _is_float(arr: Any) -> bool:
    return arr.dtype.kind == "f" or "float" in arr.dtype.name  # includes ml_dtypes' bfloat16


def read_npz(path: str | os.PathLike, *, lazy: bool = False) -> dict[str, Any]:
    """Every array of an `.npz` file under its stored key (bf16 decoded, dtypes otherwise kept).

    lazy=True: `jax_peft.lazy_npz.LazyArray`s (headers parsed, no data read; see `lazy_npz.open_npz`).
    Raises CheckpointError (a ValueError) naming the file when it is truncated or not an npz.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory; pass the path of a .npz checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist; pass the path of a .npz file")
    try:
        check_zip(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if lazy:
        return lazy_npz.open_npz(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {}
            for k in z.files:
                try:
                    out[k] = _decode(z[k])
                except ValueError as e:
                    if "allow_pickle" not in str(e):
                        raise
                    raise CheckpointError(
                        f"checkpoint {path}: array {k!r} holds pickled Python objects, which are refused for "
                        "safety (loading them can run arbitrary code). Save plain numeric arrays "
                        "(numpy.savez of float arrays, or jax_peft.save_checkpoint)") from None
            return out
    except CheckpointError:
        raise
    except (ValueError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {e}. The file is probably truncated or not a numpy .npz "
            "archive; delete it and download it again (or re-save it with numpy.savez)."
        ) from None


# ------------------------------------------------------------------------------------------ layouts


def split_prefix(keys: Iterable[str]) -> str:
    """The container prefix of a flat key set: 'opt/target/', 'params/img/', 'params/' or ''."""
    keys = set(keys)
    for p in PREFIXES:
        if f"{p}embedding/kernel" in keys:
            return p
    return ""


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _renumber(node: Any) -> Any:
    """Flax's pre-Linen -> Linen rule: per level, natural-sort the keys and renumber `<prefix>_<n>`
    with one counter per prefix (checkpoints.md section 4). Block indices are kept as stored."""
    if not isinstance(node, Mapping):
        return node
    counters: dict[str, int] = {}
    out: dict[str, Any] = {}
    for key in sorted(node, key=_natural):
        m = _NUMBERED.fullmatch(key)
        new = key
        if m and m.group(1) not in _KEEP_INDEX:
            i = counters.get(m.group(1), 0)
            counters[m.group(1)] = i + 1
            new = f"{m.group(1)}_{i}"
        out[new] = _renumber(node[key])
    return out


def detect_layout(flat_keys: Iterable[str]) -> str:
    """Naming variant of a flat key set: 'pre-Linen', 'Linen', 'big_vision' or 'big_vision-scan'."""
    keys = list(flat_keys)
    prefix = split_prefix(keys)
    inner = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    if any(k.startswith("Transformer/encoderblock/") for k in inner):
        return "big_vision-scan"
    if prefix in ("params/", "params/img/") or "pos_embedding" in inner:
        return "big_vision"
    renamed = set(paths.flatten(_renumber(paths.unflatten({k: None for k in inner}))))
    return "Linen" if renamed == set(inner) else "pre-Linen"


def normalize(flat: Mapping[str, Any], *, dtype: Any = np.float32) -> dict:
    """Flat stored arrays (any layout above) -> the canonical nested tree.

    Floating arrays are cast to `dtype` (None keeps the stored dtypes). LazyArrays stay lazy (cast
    when read; a scanned file's blocks are lazy slices of its stacked arrays), except the few small
    leaves that are reshaped or concatenated (GroupNorm scales, a big_vision position embedding).
    """
    prefix = split_prefix(flat)
    inner = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    if prefix == "params/img/":
        dropped = sorted({k.split("/")[1] for k in flat if not k.startswith(prefix)})
        if dropped:
            warnings.warn(f"two-tower checkpoint (SigLIP/LiT): loaded the image tower params/img/ and dropped "
                          f"{len(flat) - len(inner)} arrays under params/{{{', '.join(dropped)}}} (text tower, "
                          "logit temperature and bias)", stacklevel=3)
    if "embedding/kernel" not in inner:
        sample = ", ".join(list(flat)[:6])
        raise CheckpointError(
            f"not a ViT checkpoint: no 'embedding/kernel' (with or without an opt/target/, params/ or "
            f"params/img/ prefix). Keys look like: {sample}. jax_peft loads Google ViT .npz files."
        )
    out: dict[str, np.ndarray] = {}
    scanned: dict[str, np.ndarray] = {}
    for k, v in inner.items():
        v = v if isinstance(v, LazyArray) else np.asarray(_decode(np.asarray(v)))
        if dtype is not None and _is_float(v):
            v = v.astype(dtype, copy=False)
        name = k.rsplit("/", 1)[-1]
        if name in ("scale", "bias") and v.ndim == 4 and v.shape[:3] == (1, 1, 1):
            v = np.asarray(v).reshape(v.shape[-1])  # hybrid GroupNorm
        if k.startswith("Transformer/encoderblock/"):
            scanned[k[len("Transformer/encoderblock/"):]] = v
        else:
            out[k] = v
    if scanned:
        depths = {v.shape[0] if v.ndim else None for v in scanned.values()}
        if len(depths) != 1 or None in depths:
            raise CheckpointError(
                f"scanned blocks (Transformer/encoderblock/...) disagree on the leading depth axis "
                f"({sorted(map(str, depths))}); the file is inconsistent."
            )
        depth = depths.pop()
        for rest, v in scanned.items():
            for i in range(depth):
                out[f"Transformer/encoderblock_{i}/{rest}"] = v.take(i) if isinstance(v, LazyArray) else v[i]
    if "pos_embedding" in out:  # big_vision: no CLS slot, added before the CLS token
        if "Transformer/posembed_input/pos_embedding" in out:
            raise CheckpointError("checkpoint has both 'pos_embedding' and "
                                  "'Transformer/posembed_input/pos_embedding'; cannot tell which to use")
        pe = out.pop("pos_embedding")
        if "cls" in out:  # zero CLS row: the CLS token sees only its own row, so logits are unchanged
            pe = np.concatenate([np.zeros(pe.shape[:1] + (1,) + pe.shape[2:], pe.dtype), pe], axis=1)
        out["Transformer/posembed_input/pos_embedding"] = pe
    if "probe" in out:  # early big_vision MAP heads stored the head's parameters at the top level
        out = {(f"MAPHead_0/{k}" if k.split("/")[0] in _INLINED_MAP else k): v for k, v in out.items()}
    return _renumber(paths.unflatten(out))


# ------------------------------------------------------------------------------------ adapt/validate


def _np(x: Any) -> np.ndarray:
    return np.asarray(x)


def _describe(config: ViTConfig) -> str:
    c = config
    return (f"{c.name} (patch {c.patch_size}, width {c.hidden_size}, depth {c.num_layers}, heads "
            f"{c.num_heads}, mlp {c.mlp_dim}, {c.num_classes} classes, image {c.image_size}, "
            f"classifier {c.classifier!r}, representation_size {c.representation_size})")


def validate_params(params: Tree, config: ViTConfig | str) -> None:
    """Raises one ValueError listing every missing, unexpected and mis-shaped key of `params`
    against the canonical tree of `config` (a ViTConfig or a model name)."""
    if isinstance(config, str):
        config = vit_config(config)
    expected = {k: tuple(v.shape) for k, v in paths.flatten(param_shapes(config)).items()}
    got = {k: tuple(np.shape(v)) for k, v in paths.flatten(params).items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [k for k in expected if k in got and got[k] != expected[k]]
    if not (missing or unexpected or wrong):
        return
    lines = [f"parameters do not match the ViT config {_describe(config)}:"]
    if missing:
        lines.append(f"  missing ({len(missing)}):")
        lines += [f"    {k} {expected[k]}" for k in missing]
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}):")
        lines += [f"    {k} {got[k]}" for k in unexpected]
    if wrong:
        lines.append(f"  wrong shape ({len(wrong)}):")
        lines += [f"    {k}: got {got[k]}, expected {expected[k]}" for k in wrong]
    hints = []
    bad = set(missing) | set(unexpected) | set(wrong)
    if any(k.startswith("pre_logits/") for k in unexpected):
        hints.append("drop the representation layer with drop_pre_logits(params) (fine-tuning does, as "
                     "vit_jax and timm) or set representation_size")
    if any(k.startswith("head/") for k in bad):
        hints.append(f"give the model a new head with reset_head(params, {config.num_classes})")
    if "Transformer/posembed_input/pos_embedding" in wrong:
        hints.append(f"resize the position embedding with resize_pos_embedding(params, {config.image_size})")
    if any(k.startswith("Transformer/encoderblock_") or k.startswith("embedding/") for k in bad) or \
            "cls" in bad:
        hints.append("the backbone differs: build the config from the checkpoint with vit_config(params) "
                     "or pick the matching model name")
    hints.append("load_checkpoint(path, config=cfg) drops pre_logits, resets the head and resizes the "
                 "position embedding for you")
    lines.append("Fix: " + "; ".join(hints) + ".")
    raise ValueError("\n".join(lines))


def drop_pre_logits(params: Tree) -> dict:
    """A copy of `params` without the `pre_logits` representation layer (vit_jax's fine-tuning load)."""
    return {k: v for k, v in params.items() if k != "pre_logits"}


def head_width(params: Tree) -> int:
    """Input width of the head: `pre_logits` output if present, else the embedding width."""
    if "pre_logits" in params:
        return int(np.shape(params["pre_logits"]["kernel"])[-1])
    return int(np.shape(params["embedding"]["kernel"])[-1])


def reset_head(params: Tree, num_classes: int, *, init: str = "zeros", rng: Any = None,
               bias_init: float = 0.0) -> dict:
    """A copy of `params` with a fresh head {"kernel": (D, C), "bias": (C,)}.

    init: "zeros" (vit_jax, big_vision, RLRR; default), "torch_linear" (FacT/EFFT) or
    "trunc_normal" (timm, SSF); the random ones need `rng`. `bias_init` is added to the bias
    (vit_jax's `head_bias_init`).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    width = head_width(params)
    if init == "zeros":
        head = {"kernel": np.zeros((width, num_classes), np.float32),
                "bias": np.zeros((num_classes,), np.float32)}
    else:
        if rng is None:
            raise ValueError(f"reset_head(init={init!r}) is random: pass rng=jax.random.PRNGKey(...)")
        from jax_peft.methods.base import init_head

        head = {k: np.asarray(v, np.float32) for k, v in init_head(rng, width, num_classes, init).items()}
    head["bias"] = head["bias"] + np.float32(bias_init)
    return {**params, "head": head}


def _interp_axis(x: np.ndarray, new: int, axis: int) -> np.ndarray:
    """Linear interpolation along `axis` with corners aligned: out[i] = x(i * (n - 1) / (new - 1))."""
    n = x.shape[axis]
    if new == n:
        return x
    coord = np.arange(new, dtype=np.float64) * (n - 1) / (new - 1) if new > 1 else np.zeros(1)
    lo = np.clip(np.floor(coord).astype(np.int64), 0, n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = (coord - lo).reshape((-1,) + (1,) * (x.ndim - axis - 1))
    a, b = np.take(x, lo, axis=axis), np.take(x, hi, axis=axis)
    return a * (1.0 - w) + b * w


def _grid(g: int | tuple[int, int]) -> tuple[int, int]:
    gh, gw = (g, g) if isinstance(g, (int, np.integer)) else tuple(int(v) for v in g)
    if gh < 1 or gw < 1:
        raise ValueError(f"position-embedding grid must be positive, got {g}")
    return int(gh), int(gw)


def resize_pos_embedding(params_or_posemb: Tree | Any, image_size: int | None = None, *,
                         grid: int | tuple[int, int] | None = None,
                         num_prefix_tokens: int | None = None) -> Any:
    """Resizes a position embedding to a new grid with vit_jax's rule (checkpoints.md section 8).

    The CLS row is kept; the N = g*g patch rows are reshaped to (g, g, D) and resampled by
    separable linear interpolation with corners aligned (output index i samples input coordinate
    i * (g_old - 1) / (g_new - 1), as scipy.ndimage.zoom(order=1)), then flattened row-major.

    Args:
      params_or_posemb: a canonical tree (a new tree is returned) or a (1, T, D) array (an array
        is returned).
      image_size: new input resolution; the grid is image_size // patch (trees only, where the
        patch comes from `embedding/kernel`).
      grid: the new grid instead: g or (gh, gw).
      num_prefix_tokens: rows before the grid (1 for the CLS slot, 0 for 'gap'); inferred from the
        tree ('cls' present) or from the row count of an array.
    """
    is_tree = isinstance(params_or_posemb, Mapping)
    if is_tree:
        params = params_or_posemb
        pe = _np(paths.get(params, "Transformer/posembed_input/pos_embedding"))
        if num_prefix_tokens is None:
            num_prefix_tokens = 1 if "cls" in params else 0
    else:
        pe = _np(params_or_posemb)
    if (image_size is None) == (grid is None):
        raise ValueError("pass exactly one of image_size= (trees only) or grid=")
    if image_size is not None:
        if not is_tree:
            raise ValueError("an array does not know its patch size: pass grid=image_size // patch_size")
        grid = int(image_size) // int(np.shape(params["embedding"]["kernel"])[0])
    gh, gw = _grid(grid)
    if pe.ndim != 3 or pe.shape[0] != 1:
        raise ValueError(f"position embedding must have shape (1, tokens, D), got {pe.shape}")
    rows = pe.shape[1]
    if num_prefix_tokens is None:
        if int(round(rows**0.5)) ** 2 == rows:
            num_prefix_tokens = 0
        elif int(round((rows - 1) ** 0.5)) ** 2 == rows - 1:
            num_prefix_tokens = 1
        else:
            raise ValueError(f"position embedding has {rows} rows: neither g*g nor 1 + g*g; pass "
                             "num_prefix_tokens")
    n = rows - num_prefix_tokens
    g_old = int(round(n**0.5)) if n > 0 else 0
    if g_old * g_old != n or n == 0:
        raise ValueError(f"position embedding has {n} patch rows after {num_prefix_tokens} prefix "
                         "row(s), not a square grid; only square grids can be resized")
    if (gh, gw) == (g_old, g_old):
        new = pe
    else:
        g = pe[0, num_prefix_tokens:].reshape(g_old, g_old, -1).astype(np.float64)
        g = _interp_axis(_interp_axis(g, gh, 0), gw, 1)
        new = np.concatenate([pe[0, :num_prefix_tokens].astype(np.float64), g.reshape(gh * gw, -1)])
        new = new[None].astype(pe.dtype)
    if not is_tree:
        return new
    return paths.replace(params, {"Transformer/posembed_input/pos_embedding": new})


def adapt_to_config(params: Tree, config: ViTConfig, *,
                    head: Literal["auto", "keep", "reset"] = "auto") -> dict:
    """vit_jax's fine-tuning load (checkpoints.md section 7) for `config`, then validation.

    Drops `pre_logits` when `config.representation_size` is None, resizes the position embedding
    when the grid differs, and re-initializes the head with zeros when `head="reset"` or, with
    "auto", when its shape differs from `config.num_classes` (a matching head is kept, e.g. for
    evaluating an ImageNet fine-tuned file; note the original ImageNet-21k heads are all zeros).
    """
    if head not in ("auto", "keep", "reset"):
        raise ValueError(f"head must be 'auto', 'keep' or 'reset', got {head!r}")
    p = dict(params)
    if config.representation_size is None:
        p = drop_pre_logits(p)
    pe = p.get("Transformer", {}).get("posembed_input", {}).get("pos_embedding")
    prefix = 1 if config.classifier == "token" else 0
    if pe is not None and np.shape(pe)[1] != config.grid_size**2 + prefix and \
            ("cls" in p) == (config.classifier == "token"):
        p = resize_pos_embedding(p, grid=config.grid_size)
    want = (head_width(p), config.num_classes)
    have = tuple(np.shape(p["head"]["kernel"])) if "head" in p and "kernel" in p["head"] else None
    if head == "reset" or (head == "auto" and have != want):
        p = reset_head(p, config.num_classes)
    validate_params(p, config)
    return p


# ------------------------------------------------------------------------------------- public load


def is_torch_file(path: str | os.PathLike) -> bool:
    """A `.safetensors` file, or a zip archive holding a pickle (`torch.save`'s `.pth` format)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def check_blocks(params: Tree, source: str = "the checkpoint") -> None:
    """Raises CheckpointError unless the encoder blocks are `encoderblock_0 .. encoderblock_{L-1}`
    with no gap (a missing block would otherwise fail later inside flax, or be skipped)."""
    tr = params.get("Transformer", {}) if isinstance(params, Mapping) else {}
    idx = sorted(int(m.group(1)) for k in tr if (m := re.fullmatch(r"encoderblock_(\d+)", k)))
    missing = sorted(set(range(idx[-1] + 1)) - set(idx)) if idx else []
    if missing:
        raise CheckpointError(
            f"{source} has encoder blocks {idx[:3] + ['...'] + idx[-2:] if len(idx) > 6 else idx} but lacks "
            f"Transformer/encoderblock_{{{', '.join(map(str, missing))}}}: the file is incomplete (truncated "
            "export or a wrong key renaming). Re-export or download it again")


def check_finite(params: Tree, source: str = "the checkpoint", on_nonfinite: str = "warn") -> None:
    """Warns (`on_nonfinite="warn"`) or raises CheckpointError ("raise") when float leaves hold NaN or
    Inf, naming them; "ignore" skips the check."""
    if on_nonfinite not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_nonfinite must be 'warn', 'raise' or 'ignore', got {on_nonfinite!r}")
    if on_nonfinite == "ignore":
        return
    bad = [k for k, v in paths.flatten(params).items()
           if _is_float(v) and not np.all(np.isfinite(np.asarray(v, np.float32)))]
    _report_nonfinite(bad, source, on_nonfinite, stacklevel=4)


def _report_nonfinite(bad: list[str], source: str, on_nonfinite: str, stacklevel: int = 3) -> None:
    if bad:
        msg = (f"{source} holds NaN/Inf values in {len(bad)} array(s): {', '.join(bad[:5])}"
               f"{' ...' if len(bad) > 5 else ''}; outputs computed from them are NaN. Use another file "
               "(or pass on_nonfinite='ignore' if that is intended)")
        if on_nonfinite == "raise":
            raise CheckpointError(msg)
        warnings.warn(msg, stacklevel=stacklevel)


def _cast_integer_leaves(params: Tree, dtype: Any) -> dict:
    """Integer arrays where the ViT has float parameters (every leaf) -> `dtype` (float32 by default)."""
    def cast(_: str, v: Any) -> Any:
        v = v if isinstance(v, LazyArray) else np.asarray(v)
        return v.astype(dtype or np.float32) if v.dtype.kind in "iub" else v

    return paths.map_with_path(cast, params)


def load_checkpoint(path_or_url: str | os.PathLike, *, config: ViTConfig | None = None,
                    cache_dir: str | os.PathLike | None = None, head: str = "auto",
                    dtype: Any = np.float32, progress: bool = True, force_download: bool = False,
                    verify: bool = True, on_nonfinite: str = "warn", num_heads: int | None = None,
                    lazy: bool = False, sharding: Any = None) -> dict:
    """Loads a ViT checkpoint as the canonical nested tree of numpy arrays.

    PyTorch Swin Transformer files (Microsoft's `.pth`, timm's `.pth` / `.safetensors`, short names
    such as "swin_base_patch4_window7_224_22k") load as the canonical Swin tree instead (see
    `jax_peft.swin_checkpoint.load`; `config` is then a `SwinConfig`).

    Args:
      path_or_url: a local `.npz`, an `https://` or `gs://bucket/path` URL, or a short name such
        as "ViT-B_16", "imagenet21k+imagenet2012/ViT-B_16", "augreg/B_16", "SigLIP So400m/14 224"
        (see jax_peft.download). timm weights (`.safetensors`, `.pth`, `hf-hub:timm/<name>`) are
        converted by `jax_peft.timm_vit`; their head count is `num_heads`, else `config.num_heads`,
        else the standard one for the width.
      config: if given, the tree is adapted to it as vit_jax does for fine-tuning (pre_logits
        dropped, position embedding resized, head reset; see `adapt_to_config`) and validated.
        Without it the stored tree is returned as is (pre_logits and the stored head kept).
      cache_dir: download cache (default $JAX_PEFT_CACHE or ~/.cache/jax_peft).
      head: "auto" | "keep" | "reset", used with `config` (see `adapt_to_config`).
      dtype: floating arrays are cast to this (float32; None keeps the stored dtypes).
      progress, force_download, verify: download progress bar, re-download even if cached, check
        the cached file's SHA-256 against the one recorded at download.
      on_nonfinite: NaN/Inf values in the file: "warn" (default), "raise" or "ignore".
      lazy: an `.npz` is read lazily: the leaves are `jax_peft.lazy_npz.LazyArray`s (memory maps of
        the file, cast to `dtype` as they are read; `np.asarray(leaf)` reads one). The file is read
        once in 16 MiB chunks to check each member's CRC-32 and the values' finiteness (skipped with
        verify=False and on_nonfinite="ignore").
      sharding: place the tree on devices leaf by leaf (implies `lazy` for an `.npz`): a
        `jax.sharding.Sharding` for every leaf, a function `(path, leaf) -> Sharding` or a tree of
        shardings (after `config` adaptation). Each leaf is built with
        `jax.make_array_from_callback`, each addressable device reading only its own slice from the
        file, so no process holds the whole tree in host memory
        (`jax_peft.train.sharding.load_sharded` builds fsdp shardings by path rules).

    Encoder blocks must be numbered without gaps (CheckpointError otherwise). With `config`, integer
    arrays (a file written with the wrong dtype) are cast to `dtype`.
    """
    path = fetch(path_or_url, cache_dir=cache_dir, progress=progress, force_download=force_download,
                 verify=verify)
    stored: Mapping[str, Any] = {}
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin") or is_torch_file(path):
        from jax_peft import swin_checkpoint, timm_vit

        state_dict = timm_vit.read(path)
        if swin_checkpoint.is_swin_state_dict(state_dict):  # Swin Transformer weights
            return swin_checkpoint.load_state_dict(state_dict, config=config, head=head, dtype=dtype,
                                                   source=str(path))
        if not timm_vit.is_timm_state_dict(state_dict):
            raise CheckpointError(
                f"{path} holds PyTorch weights that are neither a timm ViT state dict ('patch_embed.proj.weight', "
                f"'blocks.<i>.*') nor a Swin Transformer one ('layers.<i>.blocks.<j>.*'); keys look like "
                f"{list(state_dict)[:5]}. jax_peft reads those two architectures from PyTorch files")
        heads = num_heads or (config.num_heads if config is not None else None)
        params = timm_vit.from_timm(state_dict, num_heads=heads)
    else:
        stored = read_npz(path, lazy=lazy or sharding is not None)
        params = normalize(stored, dtype=dtype)
    check_blocks(params, f"checkpoint {path}")
    if isinstance(stored, lazy_npz.LazyNpz):  # one chunked pass over the file instead of the arrays
        if on_nonfinite not in ("warn", "raise", "ignore"):
            check_finite(params, on_nonfinite=on_nonfinite)  # raises the usual error
        if verify or on_nonfinite != "ignore":
            bad = stored.verify()
            _report_nonfinite(bad if on_nonfinite != "ignore" else [], f"checkpoint {path}", on_nonfinite)
    else:
        check_finite(params, f"checkpoint {path}", on_nonfinite)
    if config is not None:
        params = adapt_to_config(_cast_integer_leaves(params, dtype), config, head=head)  # type: ignore[arg-type]
    if sharding is not None:
        params = lazy_npz.place(params, sharding)
    return params


# ------------------------------------------------------------------------------------- public save


def to_pre_linen(params: Tree) -> dict[str, np.ndarray]:
    """Canonical tree -> flat {original pre-Linen key: float32 numpy array} (inverse of `normalize`)."""
    flat = paths.flatten(params)
    if "embedding/kernel" not in flat or not any(k.startswith("Transformer/encoderblock_") for k in flat):
        raise ValueError(
            "save_checkpoint writes a ViT parameter tree (embedding/kernel, Transformer/encoderblock_i/...); "
            f"got keys like {list(flat)[:4]}. Merge adapters first (jax_peft.merge) and save the merged "
            "params; save adapters with orbax."
        )
    out: dict[str, np.ndarray] = {}
    for k, v in flat.items():
        parts = k.split("/")
        if len(parts) > 2 and parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
            parts[2] = _TO_PRE_LINEN.get(parts[2], parts[2])
        arr = np.asarray(v)
        if _is_float(arr):
            arr = arr.astype(np.float32)
        out["/".join(parts)] = arr
    back = set(paths.flatten(_renumber(paths.unflatten({k: None for k in out}))))
    if back != set(flat):
        odd = sorted(set(flat) - back)[:5]
        raise ValueError(f"the tree has non-canonical names that would not load back unchanged: {odd}. "
                         "Pass a tree with the canonical Linen names of jax_peft.vit.")
    return out


def to_big_vision(params: Tree) -> dict[str, np.ndarray]:
    """Canonical tree -> flat {big_vision key: float32 array}: a `params/` prefix, Linen names and a
    top-level `pos_embedding` without the CLS slot (the CLS row is folded into `cls`, which keeps the
    function: the CLS token only ever sees its own row)."""
    flat = {k: np.asarray(v) for k, v in to_pre_linen(params).items()}  # validates, casts to float32
    flat = paths.flatten(_renumber(paths.unflatten(flat)))  # back to the Linen names
    pe = flat.pop("Transformer/posembed_input/pos_embedding")
    if "cls" in flat:
        flat["cls"] = flat["cls"] + pe[:, :1]
        pe = pe[:, 1:]
    flat["pos_embedding"] = pe
    return {f"params/{k}": v for k, v in flat.items()}


def save_checkpoint(path: str | os.PathLike, params: Tree, *,
                    layout: Literal["vit_jax", "big_vision"] = "vit_jax") -> Path:
    """Writes `params` as a Google `.npz` (float32), atomically. Returns the path.

    layout="vit_jax" (default): the original pre-Linen layout, which loads with vit_jax, with timm's
    npz loader (`model.load_pretrained(path)`; timm loads the head only when its class count
    matches) and with `load_checkpoint`. layout="big_vision": `to_big_vision`'s layout, which
    big_vision's `vit.load` reads (e.g. a MAP-head model, `pool_type="map"`).
    A path ending in `.safetensors` writes a timm state dict instead (`jax_peft.timm_vit.save`).
    A Swin tree is written as PyTorch weights (path ending in .safetensors or .pth, timm's layout;
    see `jax_peft.swin_checkpoint.save`).
    """
    if isinstance(params, Mapping) and "patch_embed" in params and "layers_0" in params:  # a Swin tree
        from jax_peft import swin_checkpoint

        return Path(swin_checkpoint.save(path, params))
    path = Path(os.path.expanduser(os.fspath(path)))
    if path.suffix == ".safetensors":
        from jax_peft import timm_vit

        return timm_vit.save(path, params)
    if path.suffix != ".npz":
        raise ValueError(f"checkpoint path must end in .npz (numpy.savez would add it) or .safetensors "
                         f"(a timm state dict), got {path}")
    if layout not in ("vit_jax", "big_vision"):
        raise ValueError(f"layout must be 'vit_jax' or 'big_vision', got {layout!r}")
    arrays = to_pre_linen(params) if layout == "vit_jax" else to_big_vision(params)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp.npz")
    public_mode(fd)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
