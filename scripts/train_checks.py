#!/usr/bin/env python
"""End-to-end checks of the training CLI on jax_peft.configs.smoke (CPU, about a minute each).

    python scripts/train_checks.py resume  --workdir /tmp/checks [--steps 200] [--method rlrr]
    python scripts/train_checks.py devices --workdir /tmp/checks [--devices 8] [--parallel jit|pmap]

resume:  an uninterrupted run, then a run stopped by a real SIGTERM (sent once `--kill_after` steps
         are logged) and rerun with the same command; the losses at every step and the final
         checkpoint (adapter, head, optimizer state) must be bit-identical.
devices: the same run on 1 and on N simulated CPU devices
         (XLA_FLAGS=--xla_force_host_platform_device_count=N); reports the largest relative loss
         difference (summation order differs, so it is small but not zero) and compares the eval
         accuracies, which must be identical.

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
    p.add_argument("check", choices=["resume", "devices"])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--method", default="rlrr")
    p.add_argument("--kill_after", type=int, default=60, help="resume: SIGTERM once this many steps are logged")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--parallel", default="jit", choices=["jit", "pmap"])
    p.add_argument("--rtol", type=float, default=1e-4, help="devices: largest relative loss difference allowed")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    report = check_resume(args) if args.check == "resume" else check_devices(args)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
