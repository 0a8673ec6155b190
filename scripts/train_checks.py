#!/usr/bin/env python
"""End-to-end checks of the training CLI on jax_peft.configs.smoke (CPU, about a minute each).

    python scripts/train_checks.py resume  --workdir /tmp/checks [--steps 200] [--method rlrr]
    python scripts/train_checks.py devices --workdir /tmp/checks [--devices 8] [--parallel jit|pmap]
    python scripts/train_checks.py cache   --workdir /tmp/checks [--steps 20] [--model ViT-S/16]

resume:  an uninterrupted run, then a run stopped by a real SIGTERM (sent once `--kill_after` steps
         are logged) and rerun with the same command; the losses at every step and the final
         checkpoint (adapter, head, optimizer state) must be bit-identical.
devices: the same run on 1 and on N simulated CPU devices
         (XLA_FLAGS=--xla_force_host_platform_device_count=N); reports the largest relative loss
         difference (summation order differs, so it is small but not zero) and compares the eval
         accuracies, which must be identical.
cache:   a VTAB-style run through the CLI (vtab/cifar100 under tfds.testing.mock_data, a random
         `--model` at 224 px, batch 16) without the decoded cache, with it (built on first use) and
         again (read back): the losses must be bit-identical; reports each run's input wait
         (summary.json `input_wait_fraction`; the issue's goal is < 2 % of the step time with the cache).

Prints a JSON report and exits with status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(workdir: str, args: argparse.Namespace, devices: int = 1, parallel: str = "jit") -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-m", "jax_peft.main", f"--config=jax_peft.configs.smoke:{args.method}",
           f"--workdir={workdir}", f"--config.total_steps={args.steps}", "--config.progress=False",
           f"--config.parallel={parallel}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> int:
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.stderr.write(err[-3000:])
    return proc.returncode


def _losses(workdir: str) -> list[tuple[int, float, float | None]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [(r["step"], r["loss"], r.get("eval_accuracy")) for r in recs]


def _final_state(workdir: str):
    sys.path.insert(0, REPO)
    import jax

    from jax_peft.train.checkpointing import Checkpointer

    ck = Checkpointer(os.path.join(workdir, "checkpoints"))
    state, meta = ck.restore()
    ck.close()
    return meta["step"], jax.tree_util.tree_leaves(state), jax.tree_util.tree_structure(state)


_MOCK_CLI = """
import sys
import tensorflow_datasets as tfds
from jax_peft import main
sys.argv = ["jax_peft.main"] + sys.argv[1:]
with tfds.testing.mock_data(num_examples={n}):
    main.run()
"""


def check_cache(args: argparse.Namespace) -> dict:
    data_dir = os.path.join(args.workdir, "cache_data")
    shutil.rmtree(data_dir, ignore_errors=True)
    os.makedirs(data_dir)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    t0 = time.time()
    out = {}
    for run, cache in (("uncached", False), ("cache_built", True), ("cache_read", True)):
        workdir = os.path.join(args.workdir, f"cache_{run}")
        shutil.rmtree(workdir, ignore_errors=True)
        cmd = [sys.executable, "-c", _MOCK_CLI.format(n=args.mock_examples),
               f"--config=jax_peft.configs.smoke:{args.method}", f"--workdir={workdir}",
               "--config.model.checkpoint=random", f"--config.model.name={args.model}",
               "--config.model.patch_size=-1", "--config.model.hidden_size=-1", "--config.model.num_layers=-1",
               "--config.model.num_heads=-1", "--config.model.mlp_dim=-1",
               "--config.model.image_size=224", "--config.data.image_size=224",
               "--config.data.name=vtab/cifar100", "--config.data.train_split=train800val200",
               "--config.data.eval_split=test", f"--config.data.data_dir={data_dir}",
               f"--config.data.cache={cache}", "--config.batch_size=16", f"--config.total_steps={args.steps}",
               "--config.eval_every=0", "--config.checkpoint_every=0", "--config.log_every=1",
               "--config.schedule.warmup_steps=0"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            return {"check": "cache", "ok": False, "failed_run": run, "exit_code": proc.returncode}
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
        notes = [line for line in proc.stderr.splitlines() if "decoded cache" in line]
        out[run] = {"exit_code": proc.returncode, "losses": [r[1] for r in _losses(workdir)],
                    "input_wait_s": summary.get("input_wait_s"),
                    "input_wait_fraction": summary.get("input_wait_fraction"),
                    "wall_time_s": summary.get("wall_time_s"), "cache_notes": notes}
    identical = out["uncached"]["losses"] == out["cache_built"]["losses"] == out["cache_read"]["losses"]
    ok = all(r["exit_code"] == 0 for r in out.values()) and identical and len(out["uncached"]["losses"]) == args.steps
    for r in out.values():
        r["losses"] = r["losses"][:3] + ["..."]
    return {"check": "cache", "ok": ok, "model": args.model, "steps": args.steps, "losses_bit_identical": identical,
            "runs": out, "loadavg_1m": os.getloadavg()[0], "seconds": round(time.time() - t0, 1)}


def check_resume(args: argparse.Namespace) -> dict:
    import numpy as np

    straight, resumed = os.path.join(args.workdir, "straight"), os.path.join(args.workdir, "resumed")
    for d in (straight, resumed):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    rc_straight = _finish(_cli(straight, args))
    proc = _cli(resumed, args)
    metrics = os.path.join(resumed, "metrics.jsonl")
    while proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= args.kill_after:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    rc_killed = _finish(proc)
    stopped_at = len(_losses(resumed))
    rc_rerun = _finish(_cli(resumed, args))
    a, b = _losses(straight), _losses(resumed)
    (sa, la, ta), (sb, lb, tb) = _final_state(straight), _final_state(resumed)
    same_state = sa == sb and ta == tb and all(np.array_equal(x, y) for x, y in zip(la, lb))
    ok = (rc_straight == rc_killed == rc_rerun == 0 and stopped_at < args.steps and a == b and same_state)
    return {"check": "resume", "ok": ok, "steps": args.steps, "sigterm_stopped_at_step": stopped_at,
            "exit_codes": [rc_straight, rc_killed, rc_rerun], "losses_bit_identical": a == b,
            "final_checkpoint_bit_identical": same_state, "seconds": round(time.time() - t0, 1)}


def check_devices(args: argparse.Namespace) -> dict:
    import numpy as np

    one, many = os.path.join(args.workdir, "devices_1"), os.path.join(args.workdir, f"devices_{args.devices}")
    for d in (one, many):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    rcs = [_finish(_cli(one, args)), _finish(_cli(many, args, args.devices, args.parallel))]
    a, b = _losses(one), _losses(many)
    la, lb = np.array([r[1] for r in a]), np.array([r[1] for r in b])
    rel = float(np.max(np.abs(la - lb) / np.abs(la))) if len(la) == len(lb) else float("inf")
    evals_equal = [r[2] for r in a] == [r[2] for r in b]
    ok = rcs == [0, 0] and rel <= args.rtol and evals_equal
    return {"check": "devices", "ok": ok, "devices": args.devices, "parallel": args.parallel,
            "steps": args.steps, "max_relative_loss_difference": rel, "rtol": args.rtol,
            "eval_accuracies_identical": evals_equal, "exit_codes": rcs, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["resume", "devices", "cache"])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--method", default="rlrr")
    p.add_argument("--kill_after", type=int, default=60, help="resume: SIGTERM once this many steps are logged")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--parallel", default="jit", choices=["jit", "pmap"])
    p.add_argument("--model", default="ViT-S/16", help="cache: the (randomly initialized) model")
    p.add_argument("--mock_examples", type=int, default=200, help="cache: records per mocked split")
    p.add_argument("--rtol", type=float, default=1e-4, help="devices: largest relative loss difference allowed")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    report = {"resume": check_resume, "devices": check_devices, "cache": check_cache}[args.check](args)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
