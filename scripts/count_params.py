#!/usr/bin/env python
"""Trainable-parameter counts of every method from shapes only (no weights, no compilation).

For each method: the count without head (from `jax.eval_shape(method.init, ...)`), the closed-form
formula evaluated independently (must agree), the count with the mean head, and the paper's number
(methods.md §7; the papers mix "with head" and "without head" conventions).

    python scripts/count_params.py                      # ViT-B/16, VTAB plain-mean head
    python scripts/count_params.py --model ViT-L/16 --head fgvc
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

import jax_peft  # noqa: E402
from jax_peft.data import fgvc, vtab  # noqa: E402

# VTAB-1k classes per task, by group (natural, specialized, structured): 940 in total.
VTAB_GROUPS = {group: [vtab.num_classes(t) for t in tasks] for group, tasks in vtab.GROUPS.items()}
FGVC_MEAN_CLASSES = sum(d.num_classes for d in fgvc.DATASETS.values()) / len(fgvc.DATASETS)  # 234.6

# (label, method, hparams, formula text, formula(D, M, L) or None, paper number as printed, convention)
ROWS = [
    ("RLRR", "rlrr", {}, "L(19D + 3M) + 4D", lambda D, M, L: L * (19 * D + 3 * M) + 4 * D,
     "0.33M VTAB / 0.47M FGVC", "with head"),
    ("FacT-TT r=4", "fact_tt", dict(rank=4), "2Dr + L(4 + 2M/D)r²", None, "0.008M", "no head"),
    ("FacT-TT r=8", "fact_tt", dict(rank=8), "2Dr + L(4 + 2M/D)r²", None, "-", ""),
    ("FacT-TT r=16", "fact_tt", dict(rank=16), "2Dr + L(4 + 2M/D)r²", None, "-", ""),
    ("FacT-TK r=8", "fact_tk", dict(rank=8), "2Dr + r³ + L(4 + 2M/D)r", None, "0.014M", "no head"),
    ("FacT-TK r=32", "fact_tk", dict(rank=32), "2Dr + r³ + L(4 + 2M/D)r", None, "-", ""),
    ("EFFT shared r=16", "efft", dict(rank=16, variant="shared"), "(3D + M)r + 6r²", None,
     "0.16M (EFFT2 ranks)", "only with head"),
    ("EFFT shared r=32", "efft", dict(rank=32, variant="shared"), "(3D + M)r + 6r²", None,
     "0.24-0.25M", "not reproduced"),
    ("EFFT per-layer r=32", "efft", dict(rank=32, variant="per_layer"), "(3D + M)r + 6Lr²", None,
     "0.25M", "no head (hypothesis)"),
    ("SSF", "ssf", {}, "L(14D + 2M) + 4D", lambda D, M, L: L * (14 * D + 2 * M) + 4 * D, "0.24M", "with head"),
    ("LoRA r=8 (q, v)", "lora", dict(rank=8), "4LDr", lambda D, M, L: 4 * L * D * 8, "0.295M / 0.29M", "no head"),
    ("LoRA r=8 fused qkv", "lora", dict(rank=8, variant="fused_qkv"), "L·r(D + 3D)",
     lambda D, M, L: L * 8 * 4 * D, "(NOAH code)", "no head"),
    ("BitFit", "bitfit", {}, "L(7D + M) + 2D", lambda D, M, L: L * (7 * D + M) + 2 * D,
     "0.103M (FacT) / 0.14M (RLRR)", "no head / with head"),
    ("Linear probe", "linear", {}, "0", lambda D, M, L: 0, "0 (FacT) / 0.04M (RLRR)", "no head / with head"),
    ("Full fine-tuning", "full", {}, "backbone", None, "85.8M", "no head"),
]


def _fact_tt(r):
    return lambda D, M, L: 2 * D * r + L * (4 + 2 * M // D) * r * r


def _fact_tk(r):
    return lambda D, M, L: 2 * D * r + r ** 3 + L * (4 + 2 * M // D) * r


def _efft(r, per_layer):
    return lambda D, M, L: (3 * D + M) * r + (6 * L if per_layer else 6) * r * r


FORMULAS = {"FacT-TT r=4": _fact_tt(4), "FacT-TT r=8": _fact_tt(8), "FacT-TT r=16": _fact_tt(16),
            "FacT-TK r=8": _fact_tk(8), "FacT-TK r=32": _fact_tk(32), "EFFT shared r=16": _efft(16, False),
            "EFFT shared r=32": _efft(32, False), "EFFT per-layer r=32": _efft(32, True)}


# the RLRR paper's Table 4 (VTAB, with head) for the larger backbones; other cells have no paper number
PAPER_LARGE = {"ViT-L/16": {"RLRR": ("0.82M", "with head")}, "ViT-H/14": {"RLRR": ("1.33M", "with head")}}


def mean_head_classes(kind: str) -> float:
    if kind == "vtab":  # plain mean over the 19 tasks
        return sum(sum(v) for v in VTAB_GROUPS.values()) / sum(len(v) for v in VTAB_GROUPS.values())
    if kind == "vtab_group":  # mean of the three group means
        return sum(sum(v) / len(v) for v in VTAB_GROUPS.values()) / len(VTAB_GROUPS)
    if kind == "fgvc":
        return FGVC_MEAN_CLASSES
    raise ValueError(f"unknown head kind {kind!r}; use vtab, vtab_group or fgvc")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B/16", help="named ViT, e.g. ViT-B/16, ViT-L/16, ViT-H/14")
    ap.add_argument("--head", default="vtab", choices=["vtab", "vtab_group", "fgvc"],
                    help="mean head: VTAB plain mean (769·940/19 for B), mean of group means, or FGVC")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cfg = jax_peft.vit_config(args.model)
    shapes = jax_peft.param_shapes(cfg)
    D, M, L = cfg.hidden_size, cfg.mlp_dim, cfg.num_layers
    backbone = jax_peft.paths.count({k: v for k, v in shapes.items() if k != "head"})
    head = round((D + 1) * mean_head_classes(args.head))
    key = jax.random.PRNGKey(0)
    print(f"{cfg.name}: D={D}, M={M}, L={L}; backbone {backbone:,}; mean {args.head} head (D+1)·C̄ = {head:,}")
    hdr = f"{'method':<22}{'no head':>13}{'+ mean head':>13}  {'formula':<26}{'check':<7}{'paper (#param)':<30}convention"
    print(hdr)
    print("-" * len(hdr))
    failures = 0
    for label, name, hp, text, formula, paper, conv in ROWS:
        formula = formula or FORMULAS.get(label) or (lambda D, M, L: backbone)
        try:
            method = jax_peft.get_method(name, **hp)
            n = method.num_params(jax.eval_shape(method.init, key, shapes))
        except ImportError as e:  # a method module that has not landed
            print(f"{label:<22}{'n/a':>13}{'':>13}  {text:<26}{'':<7}{paper:<30}({e.name} not importable)")
            continue
        if cfg.name != "ViT-B/16":
            paper, conv = PAPER_LARGE.get(cfg.name, {}).get(label, ("-", ""))
        expected = formula(D, M, L)
        ok = "ok" if n == expected else f"≠{expected:,}"
        failures += n != expected
        print(f"{label:<22}{n:>13,}{n + head:>13,}  {text:<26}{ok:<7}{paper:<30}{conv}")
    print(f"({time.perf_counter() - t0:.1f} s, shapes only; paper numbers from methods.md §7 and §9.4)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
