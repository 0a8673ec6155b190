"""HF PEFT LoRA adapters of timm ViTs <-> jax_peft's LoRA (`adapter_config.json` +
`adapter_model.safetensors`), exact both ways.

HF PEFT stores, per adapted timm Linear `<module>` (weight W (out, in)),
`base_model.model.<module>.lora_A.weight` A (r, in) and `...lora_B.weight` B (out, r), and merges
(`merge_and_unload`) to `W + s·B A` with s = lora_alpha / r (lora_alpha / √r with `use_rslora`).
jax_peft's LoRA keeps `K + s'·a b` on Flax kernels K = Wᵀ, so a = Aᵀ, b = Bᵀ and the scale is carried
by `alpha` (s' = alpha / rank; rsLoRA: alpha = lora_alpha·√r). Module mapping (timm -> jax_peft):

    blocks.i.attn.qkv   -> variant="fused_qkv": .../MultiHeadDotProductAttention_0/qkv/{lora_a, lora_b}
    blocks.i.attn.proj  -> target "o"   (variant="separate")
    blocks.i.mlp.fc1    -> target "fc1"
    blocks.i.mlp.fc2    -> target "fc2"

jax_peft's LoRA adapts either the fused qkv projection or separate modules, so `qkv` together with
`proj`/`fc1`/`fc2` is refused, as are other modules (patch_embed.proj, attn_pool.*, head), DoRA,
trained biases and per-module rank/alpha patterns. A `modules_to_save` head (`head.weight`,
`head.bias`) is read and written as a canonical head {"kernel" (D, C), "bias" (C,)}.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jax_peft import paths
from jax_peft.methods.base import Method, get_method

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
ATTN = "MultiHeadDotProductAttention_0"
# timm module inside blocks.i -> (jax_peft LoRA target, node path inside Transformer/encoderblock_i)
MODULES = {
    "attn.qkv": ("qkv", f"{ATTN}/qkv"),
    "attn.proj": ("o", f"{ATTN}/out"),
    "mlp.fc1": ("fc1", "MlpBlock_0/Dense_0"),
    "mlp.fc2": ("fc2", "MlpBlock_0/Dense_1"),
}
_TARGET_TO_TIMM = {t: m for m, (t, _) in MODULES.items()}
_KEY = re.compile(rf"^{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight$")


class HFPeftError(ValueError):
    """An HF PEFT adapter that jax_peft's LoRA cannot express exactly."""


class HFPeftAdapter(NamedTuple):
    method: Method  # a jax_peft LoRA with the adapter's rank, scale, targets, layers and dropout
    adapter: dict  # the LoRA adapter tree
    head: dict | None  # {"kernel", "bias"} when the adapter saved timm's head (modules_to_save)


def _files(dir_or_files: str | os.PathLike | tuple) -> tuple[Path, Path]:
    if isinstance(dir_or_files, (tuple, list)):
        cfg, weights = (Path(p) for p in dir_or_files)
    else:
        d = Path(dir_or_files)
        cfg, weights = d / CONFIG_NAME, d / WEIGHTS_NAME
    for p in (cfg, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist; pass the directory PEFT's save_pretrained wrote "
                                    f"(with {CONFIG_NAME} and {WEIGHTS_NAME}) or the two file paths")
    return cfg, weights


def _check_config(cfg: Mapping[str, Any]) -> None:
    problems = []
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')!r} (only LORA)")
    if cfg.get("use_dora"):
        problems.append("use_dora=True (DoRA's magnitude vector)")
    if cfg.get("lora_bias"):
        problems.append("lora_bias=True (a bias on lora_B)")
    if cfg.get("target_parameters"):
        problems.append(f"target_parameters={cfg['target_parameters']!r} (LoRA on raw parameters)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r} (trained biases)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            problems.append(f"{key}={cfg[key]!r} (per-module rank or alpha)")
    if cfg.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=True (Conv1D layers; timm ViTs use nn.Linear)")
    extra = [m for m in (cfg.get("modules_to_save") or []) if m != "head"]
    if extra:
        problems.append(f"modules_to_save {extra} (only 'head')")
    if problems:
        raise HFPeftError("this HF PEFT adapter uses options jax_peft's LoRA does not have: " + "; ".join(problems))


def from_hf_peft(dir_or_files: str | os.PathLike | tuple, params: Mapping[str, Any] | None = None) -> HFPeftAdapter:
    """Reads an HF PEFT LoRA adapter of a timm ViT as (method, adapter, head).

    `dir_or_files`: the directory PEFT's `save_pretrained` wrote, or (config path, weights path).
    `params` (the canonical base tree, optional) checks the shapes and tells whether every block
    is adapted (then `layers=None`). `jax_peft.merge(params, method, adapter)` then equals PEFT's
    `merge_and_unload()` (see `jax_peft.timm_vit.to_timm` for the timm state dict)."""
    from jax_peft.torch_io import read_state_dict

    cfg_path, weights_path = _files(dir_or_files)
    cfg = json.loads(cfg_path.read_text())
    _check_config(cfg)
    sd = read_state_dict(weights_path)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    head: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        m = _KEY.match(k)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = np.asarray(v, np.float32)
        elif k in (f"{PREFIX}head.weight", f"{PREFIX}head.bias"):
            head[k.rsplit(".", 1)[1]] = np.asarray(v, np.float32)
        else:
            raise HFPeftError(f"unexpected tensor {k!r} in {weights_path}: jax_peft reads LoRA pairs "
                              f"({PREFIX}<module>.lora_A.weight / lora_B.weight) and a saved head only")
    if not pairs:
        raise HFPeftError(f"{weights_path} holds no LoRA pairs ({PREFIX}<module>.lora_A.weight)")
    by_target: dict[str, set[int]] = {}
    flat: dict[str, np.ndarray] = {}
    ranks = set()
    for module, ab in sorted(pairs.items()):
        mb = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
        if not mb or mb.group(2) not in MODULES:
            raise HFPeftError(f"HF PEFT adapts timm module {module!r}, which jax_peft's LoRA cannot adapt: it "
                              f"adapts blocks.<i>.{{{', '.join(MODULES)}}} only (not the patch embedding, the "
                              "attention pool or the head)")
        if set(ab) != {"A", "B"}:
            raise HFPeftError(f"{module}: has lora_{''.join(ab)} only; a LoRA pair needs lora_A and lora_B")
        i, (target, node) = int(mb.group(1)), MODULES[mb.group(2)]
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise HFPeftError(f"{module}: lora_A {a.shape} and lora_B {b.shape} are not an (r, in), (out, r) pair")
        ranks.add(a.shape[0])
        by_target.setdefault(target, set()).add(i)
        flat[f"Transformer/encoderblock_{i}/{node}/lora_a"] = a.T
        flat[f"Transformer/encoderblock_{i}/{node}/lora_b"] = b.T
    r = int(cfg.get("r", next(iter(ranks))))
    if ranks != {r}:
        raise HFPeftError(f"the LoRA pairs have ranks {sorted(ranks)} but adapter_config.json says r={r}")
    if "qkv" in by_target and len(by_target) > 1:
        others = sorted(_TARGET_TO_TIMM[t] for t in by_target if t != "qkv")
        raise HFPeftError(f"HF PEFT adapts the fused attn.qkv together with {others}: jax_peft's LoRA adapts "
                          "either the fused qkv projection (variant='fused_qkv') or separate modules, not both. "
                          "Merge it with PEFT (merge_and_unload) and load the merged timm weights instead.")
    blocks = sorted(set.union(*by_target.values()))
    if any(s != set(blocks) for s in by_target.values()):
        per = {_TARGET_TO_TIMM[t]: sorted(s) for t, s in by_target.items()}
        raise HFPeftError(f"the targets adapt different blocks ({per}); jax_peft's LoRA adapts the same "
                          "blocks for every target")
    depth = None
    if params is not None:
        from jax_peft import sites as vit_layers

        depth = vit_layers.num_blocks(params)
    # without params: all blocks when they run 0..n-1 (pass params to tell "the first n of a deeper model")
    every = blocks == list(range(depth if depth is not None else len(blocks)))
    layers = None if every else tuple(blocks)
    lora_alpha = float(cfg.get("lora_alpha", r))
    alpha = lora_alpha * math.sqrt(r) if cfg.get("use_rslora") else lora_alpha
    if "qkv" in by_target:
        method = get_method("lora", rank=r, alpha=alpha, variant="fused_qkv", layers=layers,
                            dropout=float(cfg.get("lora_dropout", 0.0)))
    else:
        targets = tuple(t for t in ("o", "fc1", "fc2") if t in by_target)
        method = get_method("lora", rank=r, alpha=alpha, targets=targets, layers=layers,
                            dropout=float(cfg.get("lora_dropout", 0.0)))
    adapter = paths.unflatten(flat)
    if params is not None:
        _check_shapes(method, adapter, params)
    out_head = None
    if head:
        if set(head) != {"weight", "bias"}:
            raise HFPeftError(f"the saved head has {sorted(head)}; expected head.weight and head.bias")
        out_head = {"kernel": head["weight"].T, "bias": head["bias"]}
    return HFPeftAdapter(method, adapter, out_head)


def _check_shapes(method: Method, adapter: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    expected = paths.flatten(method.init(jax.random.PRNGKey(0), params))
    got = paths.flatten(adapter)
    wrong = [f"{k}: {np.shape(got.get(k))} vs {np.shape(v)}" for k, v in expected.items()
             if np.shape(got.get(k)) != np.shape(v)]
    if wrong or set(got) != set(expected):
        raise HFPeftError("the HF PEFT adapter does not fit these params (adapter vs model): "
                          + "; ".join(wrong[:4] + sorted(set(got) ^ set(expected))[:4]))


def _hp(method: Method, name: str, default: Any = None) -> Any:
    return getattr(method, name, default)


def to_hf_peft(method: Method, adapter: Mapping[str, Any], out_dir: str | os.PathLike, *,
               head: Mapping[str, Any] | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Writes a jax_peft LoRA adapter as an HF PEFT adapter of a timm ViT (`adapter_config.json` +
    `adapter_model.safetensors` in `out_dir`), loadable with `PeftModel.from_pretrained(timm_model,
    out_dir)`; PEFT's merge then equals `jax_peft.merge`. fused_qkv -> target `qkv`; o/fc1/fc2 ->
    `proj`/`fc1`/`fc2`. Separate q/k/v pairs (the default LoRA: q and v) have no timm module, as timm
    fuses them: they are written exactly as one `qkv` pair of rank n·r (A stacked, B block-diagonal
    over the n adapted projections), so they re-import as variant="fused_qkv" with rank n·r.
    `head` (optional) is saved as a `modules_to_save` head. Returns `out_dir`."""
    from jax_peft.torch_io import save_safetensors

    if _hp(method, "name") != "lora":
        raise HFPeftError(f"HF PEFT export is for LoRA; got method {_hp(method, 'name')!r}")
    inverse = {node: timm for timm, (_, node) in MODULES.items()}
    which = {f"{ATTN}/{n}": j for j, n in enumerate(("query", "key", "value"))}
    tensors: dict[str, np.ndarray] = {}
    modules: set[str] = set()
    blocks: set[int] = set()
    split: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}  # block -> {q/k/v index: (a, b)}
    for node, leaves in paths.group_by_node(adapter).items():
        m = re.fullmatch(r"Transformer/encoderblock_(\d+)/(.+)", node)
        if not m or (m.group(2) not in inverse and m.group(2) not in which) or set(leaves) != {"lora_a", "lora_b"}:
            raise HFPeftError(f"adapter node {node!r} with leaves {sorted(leaves)} is not a LoRA pair on a "
                              "timm-adaptable module")
        i = int(m.group(1))
        blocks.add(i)
        a, b = (np.asarray(leaves[k], np.float32) for k in ("lora_a", "lora_b"))
        if m.group(2) in which:
            split.setdefault(i, {})[which[m.group(2)]] = (a, b)
            continue
        module = f"blocks.{i}.{inverse[m.group(2)]}"
        modules.add(inverse[m.group(2)])
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.T
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.T
    if not tensors and not split:
        raise HFPeftError("the adapter holds no LoRA pairs (Transformer/encoderblock_<i>/<module>/lora_a, lora_b)")
    rank = int(method.rank)
    if split:
        if modules:
            raise HFPeftError(f"LoRA on separate q/k/v together with {sorted(modules)}: the q/k/v pairs become "
                              "one fused qkv pair of a larger rank, and one adapter_config.json holds one rank; "
                              "export the attention and the other targets as two adapters")
        slots = {tuple(sorted(v)) for v in split.values()}
        if len(slots) != 1:
            raise HFPeftError(f"blocks adapt different q/k/v subsets ({sorted(slots)}); cannot write one rank")
        order = slots.pop()
        for i, pairs in split.items():
            d = pairs[order[0]][1].shape[1]
            big_b = np.zeros((3 * d, len(order) * rank), np.float32)
            for slot, j in enumerate(order):
                big_b[j * d:(j + 1) * d, slot * rank:(slot + 1) * rank] = pairs[j][1].T
            tensors[f"{PREFIX}blocks.{i}.attn.qkv.lora_A.weight"] = np.concatenate([pairs[j][0].T for j in order])
            tensors[f"{PREFIX}blocks.{i}.attn.qkv.lora_B.weight"] = big_b
        modules.add("attn.qkv")
        rank *= len(order)
    if head is not None:
        tensors[f"{PREFIX}head.weight"] = np.asarray(head["kernel"], np.float32).T
        tensors[f"{PREFIX}head.bias"] = np.asarray(head["bias"], np.float32)
    names = "|".join(re.escape(m) for m in sorted(modules))
    layers = _hp(method, "layers")
    idx = r"\d+" if layers is None else "|".join(str(i) for i in sorted(blocks))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        # PEFT's scaling lora_alpha / r equals jax_peft's alpha / rank (the rank grows for split q/k/v)
        "lora_alpha": float((method.rank if method.alpha is None else method.alpha) * rank / method.rank),
        "lora_dropout": float(_hp(method, "dropout", 0.0)),
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        # a regex is matched with re.fullmatch against module names: exactly these Linears, never
        # patch_embed.proj or the attention pool
        "target_modules": rf"blocks\.({idx})\.({names})",
        "layers_to_transform": None,  # PEFT refuses it beside a regex; the blocks are in the regex
        "modules_to_save": ["head"] if head is not None else None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(os.path.expanduser(os.fspath(out_dir)))
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    fd, tmp = tempfile.mkstemp(dir=out, prefix=CONFIG_NAME + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, out / CONFIG_NAME)
    return out
