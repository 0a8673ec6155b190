"""Multi-process training: two local processes (2 x 4 CPU devices, gloo collectives) through the CLI
reproduce a single process with 8 devices, and checkpoints move between the two set-ups.

The end-to-end test runs short `jax_peft.configs.smoke` trainings in two concurrent phases:

    phase 1   pair (2 processes) -> A          single (1 process, 8 devices) -> B
    phase 2   single resumes A's step-3 ckpt   (extended only) pair resumes B's step-3 ckpt

The default suite runs the pair -> single direction; `pytest -m extended` adds single -> pair.

Every child has a deadline and runs in its own process group, killed in `finally`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jax_peft.train import distributed

REPO = Path(__file__).resolve().parents[1]
STEPS, CKPT_EVERY = 6, 3
SMOKE = ["--config", "jax_peft.configs.smoke", f"--config.total_steps={STEPS}",
         f"--config.checkpoint_every={CKPT_EVERY}", "--config.eval_every=0",
         "--config.schedule.warmup_steps=2"]
PHASE_TIMEOUT_S = 240
# Float summation order differs between one process and two (gloo all-reduce across processes).
LOSS_RTOL = 1e-6  # measured: <= 1e-7 (one float32 ulp of the step-4 loss)


# ------------------------------------------------------------------------------- unit checks
def test_detect_cluster_markers():
    assert distributed.detect_cluster({}) is None
    srun = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    assert distributed.detect_cluster(srun)
    assert distributed.detect_cluster({**srun, "SLURM_STEP_NUM_TASKS": "1"}) is None
    # The batch script's shell (no srun step) of a 2-task job is one process.
    assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) is None
    assert distributed.detect_cluster({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}) is None  # no job
    assert distributed.detect_cluster({"OMPI_COMM_WORLD_SIZE": "1"}) is None
    assert distributed.detect_cluster({"OMPI_COMM_WORLD_SIZE": "4"})
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"})
    assert distributed.detect_cluster({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})


def test_initialize_is_a_no_op_for_a_plain_single_process():
    import jax

    assert distributed.initialize(env={}) is False
    assert distributed.initialize(enable=False) is False
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1 and distributed.is_main_process()


def test_initialize_rejects_contradictions():
    with pytest.raises(ValueError, match="disabled"):
        distributed.initialize("127.0.0.1:1", 2, 0, enable=False)
    with pytest.raises(ValueError, match="process_id"):
        distributed.initialize("127.0.0.1:1", 2, 5)
    with pytest.raises(ValueError, match="coordinator_address"):
        distributed.initialize(num_processes=2, process_id=0, env={})


def test_per_process_batch_size():
    assert distributed.per_process_batch_size(32, 2) == 16
    assert distributed.per_process_batch_size(32) == 32  # one process here
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        distributed.per_process_batch_size(32, 3)


def test_global_batch_and_replicate_on_one_process():
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = distributed.global_mesh()
    rows = {"image": np.arange(2 * jax.device_count() * 3, dtype=np.float32).reshape(-1, 3)}
    out = distributed.global_batch(rows, NamedSharding(mesh, P("data")))
    np.testing.assert_array_equal(np.asarray(out["image"]), rows["image"])
    repl = NamedSharding(mesh, P())
    tree = distributed.replicate({"a": np.ones(3), "b": jax.numpy.zeros(())}, repl)
    assert all(x.sharding == repl for x in jax.tree_util.tree_leaves(tree))
    assert distributed.replicate(tree, repl)["a"] is tree["a"]


# ------------------------------------------------------------------------------- end to end
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(devices: int, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"  # gRPC (coordinator) honours proxies
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    # Phase 2 compiles the same programs as phase 1: a per-test persistent cache skips that.
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


class _Children:
    """Launched CLI processes, each in its own session (process group), with their logs."""

    def __init__(self, logs: Path, cache: Path):
        self.logs, self.cache, self.procs = logs, cache, []

    def train(self, name: str, workdir: Path, num_processes: int, *flags: str) -> None:
        cmd = [sys.executable, "-m", "jax_peft.main", *SMOKE, "--workdir", str(workdir), *flags]
        if num_processes == 1:
            self._start(f"{name}", cmd, _child_env(8, self.cache))
            return
        port = _free_port()
        for i in range(num_processes):
            self._start(f"{name}_{i}", cmd + ["--coordinator_address", f"127.0.0.1:{port}",
                                             "--num_processes", str(num_processes), "--process_id", str(i)],
                        _child_env(8 // num_processes, self.cache))

    def _start(self, name, cmd, env):
        log = open(self.logs / f"{name}.log", "w")
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p, log))

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for name, p, _ in self.procs:
            try:
                rc = p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish within {timeout:.0f} s\n{self.tails()}")
            if rc != 0:
                pytest.fail(f"{name} exited with {rc}\n{self.tails()}")
        self.close()

    def tails(self) -> str:
        out = []
        for name, _, log in self.procs:
            log.flush()
            text = (self.logs / f"{name}.log").read_text(errors="replace")
            out.append(f"--- {name} (last lines)\n" + "\n".join(text.splitlines()[-25:]))
        return "\n".join(out)

    def close(self) -> None:
        for _, p, log in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
            log.close()
        self.procs = []


def _losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicate metric records (more than one writer?): {steps}"
    return {r["step"]: r["loss"] for r in records}


def _resume_copy(src: Path, dst: Path) -> None:
    """`src` as it was right after step CKPT_EVERY: later checkpoints and the summary removed."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").iterdir():
        if d.is_dir() and d.name.isdigit() and int(d.name) > CKPT_EVERY:
            shutil.rmtree(d)
    (dst / "summary.json").unlink()


def _assert_losses_equal(got: dict, want: dict, steps, what: str) -> None:
    g, w = np.array([got[s] for s in steps]), np.array([want[s] for s in steps])
    np.testing.assert_allclose(g, w, rtol=LOSS_RTOL, atol=0, err_msg=f"{what}: steps {list(steps)}")


def test_two_processes_match_one_and_their_checkpoint_resumes_on_one(tmp_path):
    _round_trip(tmp_path, back_to_the_pair=False)


@pytest.mark.extended
def test_two_processes_and_one_exchange_checkpoints_both_ways(tmp_path):
    _round_trip(tmp_path, back_to_the_pair=True)


def _round_trip(tmp_path: Path, back_to_the_pair: bool) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    a, b, c, d = (tmp_path / n for n in ("pair", "single", "single_from_pair", "pair_from_single"))
    children = _Children(logs, tmp_path / "jax_cache")
    try:
        # The pair shards the frozen backbone over all 8 devices of both processes (fsdp=8); the
        # single process is plain data parallel; the pair's checkpoint then resumes on the single one.
        children.train("pair", a, 2, "--config.mesh.fsdp=8", "--config.mesh.min_bytes=0")
        children.train("single", b, 1)
        children.wait(PHASE_TIMEOUT_S)

        la, lb = _losses(a), _losses(b)
        assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
        assert la[STEPS] < la[1]  # it trains
        _assert_losses_equal(la, lb, range(1, STEPS + 1), "2 processes x 4 devices (fsdp=8) vs 1 x 8")
        sa, sb = (json.loads((w / "summary.json").read_text()) for w in (a, b))
        assert sa["num_devices"] == sb["num_devices"] == 8
        assert sa["final_eval_accuracy"] == pytest.approx(sb["final_eval_accuracy"], abs=1 / 256)
        for w in (a, b):
            assert sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit()) == \
                [CKPT_EVERY, STEPS]

        _resume_copy(a, c)
        children.train("single_from_pair", c, 1)
        resumed = ["single_from_pair"]
        if back_to_the_pair:
            _resume_copy(b, d)
            children.train("pair_from_single", d, 2)
            resumed.append("pair_from_single_0")
        children.wait(PHASE_TIMEOUT_S)
        for name in resumed:
            assert f"resuming from step {CKPT_EVERY}" in (logs / f"{name}.log").read_text(), name
        later = range(CKPT_EVERY + 1, STEPS + 1)
        _assert_losses_equal(_losses(c), lb, later, "single process resumed from the pair's checkpoint")
        if back_to_the_pair:
            _assert_losses_equal(_losses(d), lb, later, "pair resumed from the single process's checkpoint")
    finally:
        children.close()
