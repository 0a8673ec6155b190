"""scripts/vtab_sweep.py: resume bookkeeping, emitted commands and the table built from fake summaries."""

import csv
import importlib.util
import io
import json
import os
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("vtab_sweep", os.path.join(ROOT, "scripts", "vtab_sweep.py"))
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def _write(workdir, task, acc, params=100_000, head=5_000, final=None):
    os.makedirs(os.path.join(workdir, task), exist_ok=True)
    s = {"method": "rlrr", "trainable_params": params, "trainable_params_with_head": params + head,
         "best_eval_accuracy": acc, "final_eval_accuracy": acc if final is None else final,
         "steps": 10, "wall_time_s": 1.0}
    with open(os.path.join(workdir, task, "summary.json"), "w") as f:
        json.dump(s, f)


def _rows(rows):
    return {r["row"]: r for r in rows}


def test_table_means_from_fake_summaries(tmp_path):
    wd = str(tmp_path)
    # natural tasks 0.50..0.56, specialized 0.80, structured 0.30; head sizes differ per task
    for i, t in enumerate(sweep.GROUPS["Natural"]):
        _write(wd, t, 0.50 + 0.01 * i, head=1000 * (i + 1), final=0.1)
    for t in sweep.GROUPS["Specialized"]:
        _write(wd, t, 0.80)
    for t in sweep.GROUPS["Structured"]:
        _write(wd, t, 0.30)
    rows = _rows(sweep.build_table(sweep.load_summaries(wd), "rlrr"))
    assert rows["cifar100"]["ours"] == pytest.approx(51.0)
    assert rows["cifar100"]["paper"] == 75.6
    assert rows["cifar100"]["diff"] == pytest.approx(51.0 - 75.6)
    assert rows["Natural"]["ours"] == pytest.approx(53.0)
    assert rows["Specialized"]["ours"] == pytest.approx(80.0)
    assert rows["Structured"]["ours"] == pytest.approx(30.0)
    assert rows["Plain mean"]["ours"] == pytest.approx((7 * 53.0 + 4 * 80.0 + 8 * 30.0) / 19)
    assert rows["Group mean"]["ours"] == pytest.approx((53.0 + 80.0 + 30.0) / 3)
    assert rows["Plain mean"]["paper"] == pytest.approx(74.54, abs=0.005)
    assert rows["Group mean"]["paper"] == pytest.approx(76.75, abs=0.005)
    assert rows["Natural"]["paper"] == pytest.approx(82.64, abs=0.005)
    assert rows["Params (M), no head"]["ours"] == pytest.approx(0.1)
    mean_head = (sum(1000 * (i + 1) for i in range(7)) + 12 * 5000) / 19
    assert rows["Params (M), mean head"]["ours"] == pytest.approx((100_000 + mean_head) / 1e6)
    assert rows["Params (M), mean head"]["paper"] == 0.33
    final = _rows(sweep.build_table(sweep.load_summaries(wd), "rlrr", metric="final"))
    assert final["cifar100"]["ours"] == pytest.approx(10.0)
    md = sweep.to_markdown(list(rows.values()), "rlrr")
    assert "| cifar100 | Natural | 51.00 | 75.60 | -24.60 |" in md
    assert "| **Group mean** | mean | 54.33 | 76.75 |" in md
    parsed = list(csv.DictReader(io.StringIO(sweep.to_csv(list(rows.values())))))
    assert len(parsed) == 19 + 5 + 2 and parsed[0]["row"] == "caltech101"
    assert float(parsed[0]["ours"]) == pytest.approx(50.0)


def test_partial_sweep_resumes_and_leaves_incomplete_means_empty(tmp_path, capsys):
    wd = str(tmp_path)
    _write(wd, "caltech101", 0.9)
    _write(wd, "patch_camelyon", 0.8)
    pending = sweep.pending_tasks(wd)
    assert len(pending) == 17 and "caltech101" not in pending and pending[0] == "cifar100"
    rows = _rows(sweep.build_table(sweep.load_summaries(wd), "fact_tt"))
    assert rows["caltech101"]["ours"] == pytest.approx(90.0) and rows["cifar100"]["ours"] is None
    assert rows["Natural"]["ours"] is None and rows["Plain mean"]["ours"] is None
    assert rows["Params (M), no head"]["paper"] == 0.037
    assert sweep.main(["--method", "fact_tt", "--workdir", wd, "--emit", "--",
                       "--config.data.data_dir=/d"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 17
    # the interpreter running the sweep (a venv's python works without activating the venv)
    assert out[0] == (f"{shlex.quote(sys.executable)} -m jax_peft.main --config=jax_peft.configs.vtab1k:cifar100,fact_tt "
                      f"--workdir={os.path.join(wd, 'cifar100')} --config.data.data_dir=/d")
    md_path, csv_path = tmp_path / "t.md", tmp_path / "t.csv"
    assert sweep.main(["--method", "fact_tt", "--workdir", wd, "--table-only",
                       "--markdown", str(md_path), "--csv", str(csv_path)]) == 0
    assert "| caltech101 | Natural | 90.00 | 89.60 | 0.40 |" in md_path.read_text()
    assert csv_path.read_text().startswith("row,group,ours,paper,diff\n")


def test_run_sweep_runs_pending_tasks_in_order_and_stops_on_failure(tmp_path, monkeypatch):
    wd = str(tmp_path)
    _write(wd, "caltech101", 0.9)
    calls = []

    def fake_run(cmd, cwd=None):
        workdir = [c for c in cmd if c.startswith("--workdir=")][0]
        task = workdir.rsplit(os.sep, 1)[-1]
        calls.append((cmd, cwd))
        if task != "dtd":  # dtd "crashes" without a summary
            _write(wd, task, 0.5)
        return type("P", (), {"returncode": 0 if task != "dtd" else 1})()

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    failed = sweep.run_sweep("lora", wd, extra=["--config.total_steps=1"])
    assert failed == ["dtd"] and len(calls) == 2  # cifar100 ran, dtd failed, the rest not started
    cmd, cwd = calls[0]
    assert cwd == sweep.ROOT and cmd[1:3] == ["-m", "jax_peft.main"]
    assert cmd[3] == "--config=jax_peft.configs.vtab1k:cifar100,lora"
    assert cmd[-1] == "--config.total_steps=1"
    calls.clear()
    assert sweep.run_sweep("lora", wd, keep_going=True) == ["dtd"]
    assert len(calls) == 17  # resumed: caltech101 and cifar100 skipped, every other task ran
    assert sweep.pending_tasks(wd) == ["dtd"]


def test_a_first_failure_prints_no_empty_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, cwd=None: type("P", (), {"returncode": 1})())
    assert sweep.main(["--method", "lora", "--workdir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "| task |" not in out and "row,group" not in out  # no markdown or CSV table
    assert "task caltech101 failed" in err and "no table" in err and "rerun the same command" in err
