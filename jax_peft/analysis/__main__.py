"""`python -m jax_peft.analysis RUN_DIR`: a spectral report (markdown + PNG + npz) for a trained run.

    python -m jax_peft.analysis /tmp/run                       # training workdir (orbax checkpoints)
    python -m jax_peft.analysis /tmp/run --step 500 --out /tmp/run/analysis --k 16
    python -m jax_peft.analysis --base ViT-B_16.npz --merged /tmp/run/merged.npz --out /tmp/report

Inputs: a training workdir written by `python -m jax_peft.main` (`RUN_DIR/checkpoints/<step>/{state,
config, meta}`: the adapter and head are restored, the base is rebuilt from the run's config exactly
as training built it), or two plain checkpoints (`--base` and `--merged`, any layout
`jax_peft.load_checkpoint` reads, e.g. the `merged.npz` of `export_merged=True`).

Outputs in `--out` (default `RUN_DIR/analysis`): `report.md`, `spectra.npz` (every statistic,
keys `<module>/<name>`, block axis first) and, with matplotlib installed (`pip install
jax-peft[plot]`), PNG heatmaps and spectra. The core is `report(params, method, adapter, out_dir)`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jax_peft import sites as sites_lib
from jax_peft.analysis import spectral

Tree = Mapping[str, Any]
HEATMAPS = ("delta_fro", "delta_rel", "delta_erank", "overlap_left", "overlap_right")


# --- the report core ----------------------------------------------------------------------------
def report(params: Tree, method: Any, adapter: Tree, out_dir: str, *, k: int = 8, title: str | None = None,
           plots: bool = True) -> str:
    """Writes the report for `method`/`adapter` on `params` into `out_dir`; returns report.md's path."""
    from jax_peft.merge import merge

    notes = [f"Method: {method.summary()}",
             f"Trainable adapter parameters (head excluded): {method.num_params(adapter):,}"]
    return report_trees(params, merge(params, method, adapter), out_dir, k=k,
                        title=title or getattr(method, "name", "adapter"), notes=notes, plots=plots)


def report_trees(base: Tree, adapted: Tree, out_dir: str, *, k: int = 8, title: str = "run",
                 notes: Sequence[str] = (), plots: bool = True) -> str:
    """The report for two plain parameter trees (base and merged)."""
    os.makedirs(out_dir, exist_ok=True)
    spectra = spectral.compare(base, adapted, k=k)
    rows = spectral.table(spectra)
    np.savez(os.path.join(out_dir, "spectra.npz"),
             **{f"{m}/{name}": v for m, s in spectra.items() for name, v in s.stats.items()})
    figures, plot_note = _figures(spectra, rows, out_dir) if plots else ([], "plots disabled")
    kernels = {s.kernel for s in sites_lib.sites(base).values()
               if s.kind in spectra and s.block in spectra[s.kind].blocks and s.kernel}
    md = _markdown(title, notes, spectra, rows, spectral.leaf_changes(base, adapted), k, figures, plot_note,
                   kernels)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(md)
    return path


def _figures(spectra: Mapping[str, Any], rows: list[dict], out_dir: str) -> tuple[list[tuple[str, str]], str]:
    try:
        from jax_peft.analysis import plots
        plots._pyplot()
    except ImportError as e:
        return [], str(e)
    figs = []
    for value in HEATMAPS:
        name = f"heatmap_{value}.png"
        plots.heatmap(spectra, os.path.join(out_dir, name), value=value)
        figs.append((plots.HEATMAP_VALUES[value][1], name))
    changed = [r for r in rows if r["delta_fro"] > 0]
    if changed:
        top = max(changed, key=lambda r: r["delta_rel"])
        name = f"spectrum_{top['module']}_block{top['block']}.png"
        plots.spectrum(spectra, top["module"], top["block"], os.path.join(out_dir, name))
        figs.append((f"spectra of block {top['block']} {top['module']} (largest relative change)", name))
    return figs, ""


def _fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else (f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}")


def _markdown(title: str, notes: Sequence[str], spectra: Mapping[str, Any], rows: list[dict],
              leaves: Mapping[str, tuple[float, float]], k: int, figures: list[tuple[str, str]],
              plot_note: str, kernels: set[str]) -> str:
    """`kernels`: the leaf paths of the matrices in `spectra` (listed in the tables, not again below)."""
    out = [f"# Spectral report: {title}", ""]
    out += [f"- {n}" for n in notes]
    out += [f"- Adapted matrices: {sum(r['delta_fro'] > 0 for r in rows)} of {len(rows)} "
            f"(blocks × {', '.join(spectra)})", f"- Top-k subspaces compared with k = {k}", ""]
    out += ["## Per module (mean over blocks)", "",
            "| module | shape (in, out) | ‖ΔW‖_F | ‖ΔW‖_F/‖W‖_F | rank ΔW | eff. rank ΔW | max abs Δσ/σ "
            "| top-k overlap in | top-k overlap out |", "|---|---|---|---|---|---|---|---|---|"]
    for m, s in spectra.items():
        rs = [r for r in rows if r["module"] == m]
        mean = lambda key: float(np.mean([r[key] for r in rs]))
        out.append(f"| {m} | {s.shape} | {_fmt(mean('delta_fro'))} | {_fmt(mean('delta_rel'))} | "
                   f"{_fmt(mean('delta_rank'))} | {_fmt(mean('delta_erank'))} | "
                   f"{_fmt(max(r['max_abs_rel_change'] for r in rs))} | {_fmt(mean('overlap_left'))} | "
                   f"{_fmt(mean('overlap_right'))} |")
    out += ["", "## Per block", "",
            "| block | module | ‖ΔW‖_F | rel. | rank | eff. rank | max abs Δσ/σ | overlap in | overlap out "
            "| max angle in (°) | max angle out (°) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["block"], list(spectra).index(r["module"]))):
        out.append(f"| {r['block']} | {r['module']} | {_fmt(r['delta_fro'])} | {_fmt(r['delta_rel'])} | "
                   f"{r['delta_rank']} | {_fmt(r['delta_erank'])} | {_fmt(r['max_abs_rel_change'])} | "
                   f"{_fmt(r['overlap_left'])} | {_fmt(r['overlap_right'])} | "
                   f"{_fmt(r['max_angle_left_deg'])} | {_fmt(r['max_angle_right_deg'])} |")
    other = sorted(((p, d, n) for p, (d, n) in leaves.items() if p not in kernels),
                   key=lambda t: -t[1] / (t[2] or 1.0))
    out += ["", "## Other changed leaves (biases, norms, embeddings, head)", ""]
    if other:
        out += ["| path | ‖Δ‖ | ‖base‖ |", "|---|---|---|"]
        out += [f"| {p} | {_fmt(d)} | {_fmt(n)} |" for p, d, n in other[:25]]
        if len(other) > 25:
            out.append(f"| … {len(other) - 25} more | | |")
    else:
        out.append("none")
    out += ["", "## Figures", ""]
    out += [f"![{cap}]({name})" for cap, name in figures] or [f"(no figures: {plot_note})"]
    out += ["", "## Definitions", "",
            "W is the frozen matrix view (in, out) of a module, W' the merged one, ΔW = W' − W. "
            "Rank: #σ(ΔW) above max(max(in, out)·eps·σ₁(ΔW), eps·‖W'‖_F) (the float32 rounding floor). "
            "Effective rank: exp of the entropy of σ/Σσ over the same singular values (Roy & Vetterli). "
            "Overlap: mean cos² of the principal angles between the top-k left (input) or right (output) "
            "singular subspaces of W and W' (1 = unchanged subspace). Δσ/σ compares σ_i(W') with σ_i(W).", ""]
    return "\n".join(out)


# --- loaders ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_read_only():
    """Drops orbax's "... is read only" warnings (absl logger) for the duration."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "read only" not in record.getMessage()

    absl_logger, drop = logging.getLogger("absl"), _Drop()
    absl_logger.addFilter(drop)
    try:
        yield
    finally:
        absl_logger.removeFilter(drop)

def load_run(run_dir: str, step: int | None = None) -> tuple[dict, Any, dict, dict]:
    """(params with the trained head, method, adapter, info) from a training workdir.

    The adapter and head come from the orbax checkpoint (`step`, default the latest); the base is
    rebuilt from the saved config the way training builds it (`model_setup.build_params` with the
    run's seed), which reproduces random-init bases too.
    """
    import jax
    import ml_collections
    import orbax.checkpoint as ocp

    from jax_peft.train import checkpointing, model_setup

    ckdir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckdir):
        ckdir = run_dir
    ckdir = os.path.abspath(ckdir)
    with _quiet_read_only():  # orbax warns that a read-only manager is read only (asked for here)
        mgr = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(read_only=True))
    steps = sorted(mgr.all_steps())
    if not steps:
        raise FileNotFoundError(f"no orbax checkpoint under {ckdir}; pass a training workdir "
                                "(python -m jax_peft.main ... --workdir DIR) or use --base/--merged")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {ckdir}; available steps: {steps}")
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                     config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    mgr.close()
    config = ml_collections.ConfigDict(dict(out["config"]))
    trainable = jax.tree_util.tree_map(np.asarray, dict(out["state"]["trainable"]))
    method = model_setup.build_method(config)
    head = dict(trainable["head"])
    num_classes = int(np.shape(head["kernel"])[-1])
    r_params, _ = jax.random.split(jax.random.PRNGKey(int(config.seed)))
    _, params = model_setup.build_params(config, method, num_classes, r_params)
    params["head"] = head
    adapter = trainable.get("adapter", {})
    # the method rebuilt from the stored config must be the one the adapter was trained with (a default
    # changed since?); older checkpoints without a recorded spec are not checked
    checkpointing.check_adapter_spec(dict(out["meta"] or {}), method, params, where=f"checkpoint {step} in {ckdir}",
                                     fix="analyse it with the jax_peft version that trained it")
    return params, method, _plain(adapter), {"step": step, "checkpoint_dir": ckdir, "config": config}


def _plain(tree: Any) -> Any:
    """orbax may restore empty subtrees as None and dicts as other mappings; normalize to dicts."""
    if tree is None:
        return {}
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return np.asarray(tree)


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m jax_peft.analysis", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", help="training workdir (or its checkpoints/ directory)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--base", help="base checkpoint (with --merged, instead of RUN_DIR)")
    ap.add_argument("--merged", help="merged checkpoint, e.g. RUN_DIR/merged.npz")
    ap.add_argument("--out", help="output directory (default RUN_DIR/analysis or next to --merged)")
    ap.add_argument("--k", type=int, default=8, help="top-k subspace size (default 8)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    a = ap.parse_args(argv)
    if (a.base is None) != (a.merged is None):
        ap.error("--base and --merged go together")
    if a.base is not None:
        if a.run_dir is not None:
            ap.error("give either RUN_DIR or --base/--merged, not both")
        from jax_peft.checkpoint import load_checkpoint

        base, merged = load_checkpoint(a.base), load_checkpoint(a.merged)
        out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.merged)), "analysis")
        path = report_trees(_drop_head(base), _drop_head(merged), out, k=a.k,
                            title=os.path.basename(a.merged), plots=not a.no_plots,
                            notes=[f"Base: {a.base}", f"Merged: {a.merged}"])
    elif a.run_dir is not None:
        params, method, adapter, info = load_run(a.run_dir, a.step)
        out = a.out or os.path.join(a.run_dir, "analysis")
        path = report(params, method, adapter, out, k=a.k, plots=not a.no_plots,
                      title=f"{os.path.basename(os.path.abspath(a.run_dir))} (step {info['step']})")
    else:
        ap.error("give a training workdir, or --base BASE --merged MERGED")
    print(path)
    return path


def _drop_head(params: Tree) -> dict:
    """Heads of a base and a fine-tuned model usually differ in classes: compare the body only."""
    return {k: v for k, v in params.items() if k not in ("head", "pre_logits")}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
