#!/usr/bin/env python
"""Trainable-parameter counts of every method from shapes only (no weights, no compilation).

For each method: the count without head (from `jax.eval_shape(method.init, ...)`), the closed-form
formula evaluated independently (must agree), the count with the mean head, and the paper's number
(methods.md §7; the papers mix "with head" and "without head" conventions).

    python scripts/count_params.py                      # ViT-B/16, VTAB plain-mean head
    python scripts/count_params.py --model ViT-L/16 --head fgvc
    python scripts/count_params.py --model Swin-B       # the Swin variants (also Swin-T, Swin-S, Swin-L)
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


# --- Swin: stage widths D_i, depths L_i (L = ΣL_i blocks); closed forms of each method's Swin variant ---
def _blocks(c):  # Σ over blocks of the block's width
    return sum(c.stage_dim(i) * d for i, d in enumerate(c.depths))


def _merges(c):  # Σ over the merging layers of their input stage's width
    return sum(c.stage_dim(i) for i in range(c.num_stages - 1))


def _efft_swin(r, a, b):
    def count(c):
        n = 0
        for i, depth in enumerate(c.depths):
            g, d = 2 ** i, c.stage_dim(i)
            n += 2 * d * r * g + 4 * (r * g) ** 2 + d * a * g + depth * a * g * b * g + b * g * 4 * d
        return n
    return count


def _fact_swin(r, tk):
    def count(c):
        n = 0
        for i, depth in enumerate(c.depths):
            n += 2 * r * c.stage_dim(i) + (r ** 3 + 12 * r * depth if tk else 12 * r * r * depth)
        return n
    return count


# (label, method, hparams, formula text, formula(SwinConfig), paper number for Swin-B as printed, convention)
SWIN_ROWS = [
    ("RLRR (Swin variant)", "rlrr", {}, "29ΣD_b + 8ΣD_merge + 2D_last",
     lambda c: 29 * _blocks(c) + 8 * _merges(c) + 2 * c.hidden_size, "0.41M (RLRR Table 5)", "with head"),
    ("FacT-TT r=16", "fact_tt", dict(rank=16), "Σ_i 2rD_i + 12r²L", _fact_swin(16, False),
     "0.135M (FacT Table 2)", "no head"),
    ("FacT-TK r=16", "fact_tk", dict(rank=16), "Σ_i 2rD_i + r³ + 12rL_i", _fact_swin(16, True), "-", ""),
    ("EFFT Swin-B setter", "efft", {}, "ranks 4·2^i, (2, 4)·2^i", _efft_swin(4, 2, 4), "0.49M (paper)",
     "not this setter"),
    ("EFFT Swin-S setter", "efft", dict(mlp_rank=(4, 8)), "ranks 4·2^i, (4, 8)·2^i", _efft_swin(4, 4, 8),
     "0.49M (paper)", "no head"),
    ("EFFT Swin-L setter", "efft", dict(rank=8, mlp_rank=(8, 16)), "ranks 8·2^i, (8, 16)·2^i",
     _efft_swin(8, 8, 16), "-", ""),
    ("SSF (official Swin)", "ssf", {}, "22ΣD_b + 4D_0 + 2D_last",
     lambda c: 22 * _blocks(c) + 4 * c.embed_dim + 2 * c.hidden_size, "-", ""),
    ("LoRA r=8 (q, v)", "lora", dict(rank=8), "4r·ΣD_b", lambda c: 32 * _blocks(c), "-", ""),
    ("BitFit", "bitfit", {}, "11ΣD_b + 4ΣD_merge + 2D_0 + D_last",
     lambda c: 11 * _blocks(c) + 4 * _merges(c) + 2 * c.embed_dim + c.hidden_size, "-", ""),
    ("Linear probe", "linear", {}, "0", lambda c: 0, "-", ""),
]


def swin_main(model: str, head_kind: str) -> int:
    """The Swin table: every method's Swin count (shapes only) beside its closed form and the paper."""
    cfg = jax_peft.swin_config(model)
    shapes = jax_peft.swin.param_shapes(cfg)
    backbone = jax_peft.paths.count({k: v for k, v in shapes.items() if k != "head"})
    head = round((cfg.hidden_size + 1) * mean_head_classes(head_kind))
    print(f"{cfg.name}: widths {[cfg.stage_dim(i) for i in range(cfg.num_stages)]}, depths {list(cfg.depths)}; "
          f"backbone {backbone:,}; mean {head_kind} head (D+1)·C̄ = {head:,}")
    hdr = f"{'method':<22}{'no head':>13}{'+ mean head':>13}  {'formula':<36}{'check':<7}{'paper (#param)':<24}convention"
    print(hdr)
    print("-" * len(hdr))
    failures = 0
    for label, name, hp, text, formula, paper, conv in SWIN_ROWS:
        method = jax_peft.get_method(name, **hp)
        n = method.num_params(jax.eval_shape(method.init, jax.random.PRNGKey(0), shapes))
        expected = formula(cfg)
        failures += n != expected
        paper, conv = (paper, conv) if cfg.name == "Swin-B" else ("-", "")
        print(f"{label:<22}{n:>13,}{n + head:>13,}  {text:<36}{'ok' if n == expected else f'≠{expected:,}':<7}"
              f"{paper:<24}{conv}")
    print("(D_b: a block's width; rlrr / efft / fact_* run their Swin variants, docs/swin.md)")
    return 1 if failures else 0


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
    ap.add_argument("--model", default="ViT-B/16", help="named ViT (ViT-B/16, ViT-L/16, ViT-H/14) or Swin (Swin-B, ...)")
    ap.add_argument("--head", default="vtab", choices=["vtab", "vtab_group", "fgvc"],
                    help="mean head: VTAB plain mean (769·940/19 for B), mean of group means, or FGVC")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    if args.model.lower().startswith("swin"):
        return swin_main(args.model, args.head)
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
