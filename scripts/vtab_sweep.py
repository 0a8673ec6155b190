"""Run one method over the 19 VTAB-1k tasks and print the paper-style table beside the paper's numbers.

    # run every task in sequence (tasks with DIR/<task>/summary.json are skipped: rerun to resume)
    python scripts/vtab_sweep.py --method rlrr --workdir runs/rlrr -- --config.data.data_dir=$HOME/tensorflow_datasets

    # print one command per task (for a cluster), then build the table once they finished
    python scripts/vtab_sweep.py --method fact_tt --workdir runs/fact_tt --emit
    python scripts/vtab_sweep.py --method fact_tt --workdir runs/fact_tt --table-only \\
        --markdown runs/fact_tt/table.md --csv runs/fact_tt/table.csv

Arguments after `--` are passed to every `python -m jax_peft.main` run. The table reports, per task,
the best test accuracy over the periodic evaluations (what the papers report; `--metric final` for the
last one), the Natural / Specialized / Structured means, the plain 19-task mean and the mean of the
three group means (RLRR prints plain means, FacT group means, EFFT both), and the trainable
parameters (without head, and with the mean head over the tasks), next to the published numbers
(`jax_peft.configs.recipes`, docs/methods.md section 9).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import subprocess
import sys

from jax_peft.configs import recipes as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = R.VTAB_TASKS
GROUPS = R.VTAB_GROUPS


# --- running ------------------------------------------------------------------------------------------
def task_command(method: str, task: str, workdir: str, *, config: str = "jax_peft.configs.vtab1k",
                 extra: list[str] = (), python: str = sys.executable) -> list[str]:
    return [python, "-m", "jax_peft.main", f"--config={config}:{task},{method}",
            f"--workdir={os.path.join(workdir, task)}", *extra]


def summary_path(workdir: str, task: str) -> str:
    return os.path.join(workdir, task, "summary.json")


def pending_tasks(workdir: str, tasks=TASKS) -> list[str]:
    """Tasks without a summary.json (the ones a resumed sweep still has to run)."""
    return [t for t in tasks if not os.path.isfile(summary_path(workdir, t))]


def run_sweep(method: str, workdir: str, *, tasks=TASKS, config: str = "jax_peft.configs.vtab1k",
              extra: list[str] = (), keep_going: bool = False) -> list[str]:
    """Runs the pending tasks in sequence; returns the tasks that failed."""
    failed = []
    workdir = os.path.abspath(workdir)  # the runs start in the repository root (python -m jax_peft.main)
    config = os.path.abspath(config) if os.path.isfile(config) else config  # a file, or a module path
    for task in pending_tasks(workdir, tasks):
        cmd = task_command(method, task, workdir, config=config, extra=list(extra))
        print("+", shlex.join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0 or not os.path.isfile(summary_path(workdir, task)):
            failed.append(task)
            print(f"task {task} failed (no summary.json)", file=sys.stderr, flush=True)
            if not keep_going:
                break
    return failed


# --- the table ----------------------------------------------------------------------------------------
def load_summaries(workdir: str, tasks=TASKS) -> dict[str, dict]:
    out = {}
    for t in tasks:
        p = summary_path(workdir, t)
        if os.path.isfile(p):
            with open(p) as f:
                out[t] = json.load(f)
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(per_task: dict[str, float | None]) -> dict[str, float | None]:
    """Group means, plain 19-task mean and mean of group means over `per_task` (None = missing).
    A mean is None unless every task it covers is present."""
    out = {}
    for g, ts in GROUPS.items():
        vals = [per_task.get(t) for t in ts]
        out[g] = None if any(v is None for v in vals) else _mean(vals)
    allv = [per_task.get(t) for t in TASKS]
    out["Plain mean"] = None if any(v is None for v in allv) else _mean(allv)
    gm = [out[g] for g in GROUPS]
    out["Group mean"] = None if any(v is None for v in gm) else _mean(gm)
    return out


def build_table(summaries: dict[str, dict], method: str, *, metric: str = "best") -> list[dict]:
    """Rows {"row", "group", "ours", "paper", "diff"}: 19 tasks, 5 means, 2 parameter rows.
    Accuracies in %, parameters in millions."""
    key = {"best": "best_eval_accuracy", "final": "final_eval_accuracy"}[metric]
    ours = {t: (100.0 * s[key] if s.get(key) is not None else None) for t, s in summaries.items()}
    paper = R.PAPER_RESULTS.get(method, {})
    rows = []
    for g, ts in GROUPS.items():
        for t in ts:
            rows.append({"row": t, "group": g, "ours": ours.get(t), "paper": paper.get(t)})
    ours_m, paper_m = summarize(ours), summarize(paper)
    for name in list(GROUPS) + ["Plain mean", "Group mean"]:
        rows.append({"row": name, "group": "mean", "ours": ours_m[name], "paper": paper_m[name]})
    no_head = _mean([s.get("trainable_params") for s in summaries.values()])
    with_head = _mean([s.get("trainable_params_with_head") for s in summaries.values()])
    info = R.PAPER_INFO.get(method, {})
    rows.append({"row": "Params (M), no head", "group": "params",
                 "ours": None if no_head is None else no_head / 1e6,
                 "paper": info.get("params_no_head_m")})
    rows.append({"row": "Params (M), mean head", "group": "params",
                 "ours": None if with_head is None else with_head / 1e6,
                 "paper": info.get("params_with_head_m")})
    for r in rows:
        r["diff"] = None if r["ours"] is None or r["paper"] is None or r["group"] == "params" \
            else r["ours"] - r["paper"]
    return rows


def _fmt(v, digits):
    return "" if v is None else f"{v:.{digits}f}"


def to_markdown(rows: list[dict], method: str) -> str:
    info = R.PAPER_INFO.get(method, {})
    head = (f"VTAB-1k, {method} (ours) vs paper row '{info.get('row', '-')}' ({info.get('source', '-')}; "
            f"printed mean: {info.get('mean', '-')})\n\n")
    lines = ["| task | group | ours | paper | diff |", "|---|---|---:|---:|---:|"]
    for r in rows:
        d = 4 if r["group"] == "params" else 2
        name = f"**{r['row']}**" if r["group"] in ("mean", "params") else r["row"]
        lines.append(f"| {name} | {r['group']} | {_fmt(r['ours'], d)} | {_fmt(r['paper'], d)} | "
                     f"{_fmt(r['diff'], 2)} |")
    return head + "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["row", "group", "ours", "paper", "diff"], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else (round(r[k], 6) if isinstance(r[k], float) else r[k]))
                    for k in w.fieldnames})
    return buf.getvalue()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=R.METHODS)
    p.add_argument("--workdir", required=True, help="sweep directory; task runs go to WORKDIR/<task>")
    p.add_argument("--config", default="jax_peft.configs.vtab1k")
    p.add_argument("--tasks", default="", help="comma-separated subset (default: all 19)")
    p.add_argument("--emit", action="store_true", help="print one command per pending task and exit")
    p.add_argument("--table-only", action="store_true", help="only build the table from summaries")
    p.add_argument("--keep-going", action="store_true", help="continue after a failed task")
    p.add_argument("--metric", choices=("best", "final"), default="best")
    p.add_argument("--markdown", default="", help="also write the markdown table here")
    p.add_argument("--csv", default="", help="also write the CSV table here")
    args = p.parse_args(argv)
    tasks = tuple(R.canonical_task(t) for t in args.tasks.split(",") if t.strip()) or TASKS

    if args.emit:
        for t in pending_tasks(args.workdir, tasks):
            # this interpreter (e.g. .venv/bin/python), so the commands run without activating the venv
            print(shlex.join(task_command(args.method, t, args.workdir, config=args.config, extra=extra)))
        return 0
    failed = [] if args.table_only else run_sweep(args.method, args.workdir, tasks=tasks,
                                                   config=args.config, extra=extra,
                                                   keep_going=args.keep_going)
    summaries = load_summaries(args.workdir)
    if not summaries:  # e.g. the first task failed: no table of 19 empty rows
        print(f"no task has finished yet (no {args.workdir}/<task>/summary.json): no table. "
              + ("Fix the failure above and rerun the same command (finished tasks are skipped)."
                 if failed else "Run the sweep first (without --table-only)."), file=sys.stderr)
        return 1
    rows = build_table(summaries, args.method, metric=args.metric)
    md, table_csv = to_markdown(rows, args.method), to_csv(rows)
    print(md)
    print(table_csv)
    for path, text in ((args.markdown, md), (args.csv, table_csv)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    missing = pending_tasks(args.workdir, TASKS)
    if missing:
        print(f"{len(missing)} task(s) without summary.json: {', '.join(missing)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
