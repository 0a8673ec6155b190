"""Inspect a Google ViT `.npz` checkpoint: stored tree, parameter counts per group, architecture.

    python scripts/inspect_checkpoint.py FILE_OR_URL [--cache-dir DIR] [--max-rows N]

FILE_OR_URL is anything `jax_peft.load_checkpoint` accepts (local path, https:// or gs:// URL, or a
short name such as ViT-B_16, which is downloaded into the cache). Prints:
  1. the stored arrays (stored key, shape, dtype, size);
  2. parameter counts per group of the canonical tree (embedding, cls+posemb, each block, final
     norm, pre_logits, head) and the backbone without the head (the PEFT papers' count);
  3. the detected architecture and naming variant (pre-Linen / Linen / big_vision / big_vision-scan).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from jax_peft import paths  # noqa: E402
from jax_peft.checkpoint import detect_layout, normalize, read_npz, split_prefix  # noqa: E402
from jax_peft.download import fetch  # noqa: E402
from jax_peft.vit import infer_config  # noqa: E402


def group_of(path: str) -> str:
    """Parameter group of a canonical path."""
    if path.startswith("embedding/"):
        return "embedding"
    if path == "cls" or path.startswith("Transformer/posembed_input/"):
        return "cls+posemb"
    m = re.match(r"Transformer/encoderblock_(\d+)/", path)
    if m:
        return f"block {int(m.group(1))}"
    if path.startswith("Transformer/encoder_norm/"):
        return "final norm"
    if path.startswith("pre_logits/"):
        return "pre_logits"
    if path.startswith("head/"):
        return "head"
    return "other"


def group_counts(params: Mapping[str, Any]) -> dict[str, int]:
    """{group: parameter count} in model order, plus 'backbone (no head, no pre_logits)' and 'total'.

    The backbone count excludes the head and pre_logits (85,798,656 for ViT-B/16 at 224 px).
    """
    counts: dict[str, int] = {}
    for path, leaf in paths.flatten(params).items():
        g = group_of(path)
        counts[g] = counts.get(g, 0) + int(np.prod(np.shape(leaf)))

    def order(g: str) -> tuple:
        fixed = ["embedding", "cls+posemb"]
        if g in fixed:
            return (fixed.index(g), 0)
        if g.startswith("block "):
            return (2, int(g.split()[1]))
        return (3 + ["final norm", "pre_logits", "head", "other"].index(g), 0)

    out = {g: counts[g] for g in sorted(counts, key=order)}
    total = sum(out.values())
    out["backbone (no head, no pre_logits)"] = total - out.get("head", 0) - out.get("pre_logits", 0)
    out["total"] = total
    return out


def architecture(params: Mapping[str, Any], stored_keys: Sequence[str]) -> dict[str, Any]:
    """Detected architecture of a canonical tree, with the naming variant of its stored keys."""
    cfg = infer_config(params)
    head = params.get("head", {})
    kernel = head.get("kernel") if isinstance(head, Mapping) else None
    return {
        "model": cfg.name,
        "patch": cfg.patch_size,
        "width": cfg.hidden_size,
        "depth": cfg.num_layers,
        "heads": f"{cfg.num_heads} x {cfg.head_dim}",
        "mlp": cfg.mlp_dim,
        "classes": cfg.num_classes if "head" in params else "no head",
        "image size": f"{cfg.image_size} ({cfg.grid_size}x{cfg.grid_size} patches)",
        "classifier": cfg.classifier,
        "pre_logits": cfg.representation_size if cfg.representation_size else "no",
        "head all zeros": bool(kernel is not None and not np.any(np.asarray(kernel))),
        "naming variant": detect_layout(stored_keys),
        "prefix": split_prefix(stored_keys) or "none",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="local .npz, https:// or gs:// URL, or a short name (ViT-B_16)")
    parser.add_argument("--cache-dir", default=None, help="download cache (default $JAX_PEFT_CACHE or "
                        "~/.cache/jax_peft)")
    parser.add_argument("--max-rows", type=int, default=None, help="print at most this many stored arrays")
    args = parser.parse_args(argv)

    try:
        path = fetch(args.checkpoint, cache_dir=args.cache_dir)
        stored = read_npz(path)
    except (OSError, ValueError) as e:  # unknown name, missing file, download failure, bad file
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# {path}\n\n## stored arrays ({len(stored)})")
    print(paths.summarize(stored, max_rows=args.max_rows))  # stored keys, in file order

    params = normalize(stored)
    print("\n## parameters per group (canonical tree)")
    counts = group_counts(params)
    w = max(len(g) for g in counts)
    for g, n in counts.items():
        print(f"{g.ljust(w)}  {n:>14,}")

    print("\n## architecture")
    try:
        arch = architecture(params, list(stored))
    except ValueError as e:
        print(f"not a recognizable ViT: {e}")
        return 1
    w = max(len(k) for k in arch)
    for k, v in arch.items():
        print(f"{k.ljust(w)}  {v}")
    if arch["head all zeros"]:
        print("\nnote: the head is all zeros (as in the original ImageNet-21k files): reset it for "
              "fine-tuning (load_checkpoint(..., config=cfg) does) and do not use it for inference.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
