"""The training CLI as a user meets it: Ctrl-C (SIGINT) saves a checkpoint like SIGTERM and the same
command resumes; a second Ctrl-C aborts; a failed checkpoint download is one line naming the CLI fix."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jax_peft.configs import smoke
from jax_peft.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "jax_peft.configs.smoke"
OVERRIDES = {"total_steps": 100000, "eval_every": 0, "checkpoint_every": 0, "model.num_layers": 1}


def _cli(workdir, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "jax_peft.main", "--config", f"{SMOKE}:bitfit", "--workdir", str(workdir),
           *[f"--config.{k}={v}" for k, v in OVERRIDES.items()], *extra]
    # A shell without job control starts background jobs (such as a CI runner's) with SIGINT ignored,
    # which the child would inherit (and Python and the loop respect): spawn it while this process has
    # a handler, which exec resets to the default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def _steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def _interrupt_after(proc, workdir, min_step, timeout=240):
    """Sends SIGINT once metrics.jsonl reaches `min_step`; returns (rc, stdout, stderr)."""
    t0 = time.time()
    while max(_steps(workdir), default=0) < min_step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "the run did not reach the step in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_ctrl_c_saves_and_the_same_command_resumes(tmp_path):
    wd = tmp_path / "run"
    rc, out, err = _interrupt_after(_cli(wd), wd, 3)
    assert rc == 0, err
    first = json.loads(out)
    assert first["preempted"] is True and first["step"] >= 3
    assert "Ctrl-C (SIGINT): saved a checkpoint at step" in err and "Traceback" not in err
    assert str(first["step"]) in os.listdir(wd / "checkpoints")

    # The same config resumes from that checkpoint (in process: a second CLI start costs ~20 s of CPU).
    config = smoke.get_config("bitfit")
    for key, value in OVERRIDES.items():
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = getattr(node, part)
        setattr(node, last, value)
    config.progress = False
    second = loop.train_and_evaluate(config, str(wd), stop_at=first["step"] + 2)
    assert second == {"preempted": True, "step": first["step"] + 2}
    assert _steps(wd) == list(range(1, second["step"] + 1))  # one record per step, none lost or repeated


def test_second_ctrl_c_aborts():
    # Python's default handler, as in a terminal (a CI shell may start us with SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with loop._Preemption() as pre:
            os.kill(os.getpid(), signal.SIGINT)
            assert pre.requested and pre.signal_name.startswith("Ctrl-C")
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # An ignored SIGINT stays ignored (nohup, background jobs).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with loop._Preemption() as pre:
            os.kill(os.getpid(), signal.SIGINT)
            assert not pre.requested
    finally:
        signal.signal(signal.SIGINT, previous)


def test_failed_download_is_one_line_with_the_cli_fix(tmp_path):
    url = "https://127.0.0.1:9/vit_models/ViT-B_16.npz"  # nothing listens on port 9: refused at once
    env_cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "jax_peft.main", "--config", SMOKE,
         "--workdir", str(tmp_path / "run"), f"--config.model.checkpoint={url}"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_PEFT_CACHE=str(env_cache)))
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--config.model.checkpoint=/path/to/ViT-B_16.npz" in lines[0]
    assert str(env_cache / "127.0.0.1_9" / "vit_models" / "ViT-B_16.npz") in lines[0]
