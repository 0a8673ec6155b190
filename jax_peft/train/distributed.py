"""Multi-process (multi-host) training with JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program; `initialize` connects them before any JAX computation, after
which `jax.devices()` lists the devices of ALL processes and `jax.local_devices()` this process's.

    initialize(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0)  # explicit
    initialize(enable=True)      # cluster auto-detection (Cloud TPU pod slice, SLURM, Open MPI)
    initialize()                 # auto-detect only when the environment says it is a multi-process
                                 # job (see `detect_cluster`); a plain single-process run is untouched

Data-parallel conventions used by the trainer (`jax_peft.train.step`, `loop`):

* The mesh spans `jax.devices()` (`global_mesh`); the batch axis is sharded over it and the
  train state / frozen parameters are replicated.
* `config.batch_size` is the GLOBAL batch. Each process loads `per_process_batch_size(B)` =
  B / process_count rows (its disjoint shard, chosen by `jax.process_index()`) and
  `global_batch` assembles the global `jax.Array` with `jax.make_array_from_process_local_data`:
  process i's rows are the global rows [i * B/P, (i + 1) * B/P) (devices are ordered by process).
* `is_main_process()` (process 0) writes metrics, progress and summaries; orbax checkpoint saves
  and restores are collective and must run on all processes, to a path all of them can reach.

CPU collectives: cross-process all-reduces on CPU devices need a collectives implementation. In
jax 0.10 the config `jax_cpu_collectives_implementation` defaults to "gloo" (TCP, bootstrapped by the
distributed client), so `initialize` is all that is needed; `"mpi"` can be chosen with
`JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi` (needs an MPI library). Several CPU devices per process
come from `XLA_FLAGS=--xla_force_host_platform_device_count=N` (or `jax_num_cpu_devices`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

AXIS = "data"

# Environment variables that mark a multi-process job, with the check that it has > 1 process.
_MARKERS: tuple[tuple[str, str], ...] = (
    ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS is set"),
    ("SLURM_STEP_NUM_TASKS", "an srun job step with SLURM_STEP_NUM_TASKS > 1"),
    ("OMPI_COMM_WORLD_SIZE", "an Open MPI launch with OMPI_COMM_WORLD_SIZE > 1"),
    ("TPU_WORKER_HOSTNAMES", "a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists > 1 host)"),
    ("MEGASCALE_COORDINATOR_ADDRESS", "a multi-slice TPU job (MEGASCALE_COORDINATOR_ADDRESS is set)"),
)


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """Why the environment looks like a multi-process job, or None for a plain single process.

    Checked markers: `JAX_COORDINATOR_ADDRESS`; SLURM (an `srun` step: `SLURM_JOB_ID`, `SLURM_PROCID`
    and `SLURM_STEP_NUM_TASKS` > 1; a batch script's own shell is one process even when the job has
    several tasks);
    Open MPI (`OMPI_COMM_WORLD_SIZE` > 1); TPU (`TPU_WORKER_HOSTNAMES` with several hosts, or
    `MEGASCALE_COORDINATOR_ADDRESS`). A Cloud TPU VM reached with `gcloud ... ssh --worker=all` does
    not always export these; pass `--distributed` (`initialize(enable=True)`) there.
    """
    env = os.environ if env is None else env
    for name, reason in _MARKERS:
        value = env.get(name, "").strip()
        if not value:
            continue
        if name == "SLURM_STEP_NUM_TASKS":
            if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and _int(value) > 1:
                return reason
        elif name == "OMPI_COMM_WORLD_SIZE":
            if _int(value) > 1:
                return reason
        elif name == "TPU_WORKER_HOSTNAMES":
            if len([h for h in value.split(",") if h.strip()]) > 1:
                return reason
        else:
            return reason
    return None


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None, *,
               enable: bool | None = None, initialization_timeout: int = 300,
               env: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize` when this run is (or is told to be) multi-process.

    Args:
      coordinator_address, num_processes, process_id, local_device_ids: as in
        `jax.distributed.initialize` (HOST:PORT of process 0, process count, this process's index,
        devices this process drives). Giving any of them means "initialize"; the others are then
        auto-detected by JAX where it can (TPU, SLURM, Open MPI) and otherwise required.
      enable: True forces initialization (auto-detection of whatever is not given); False never
        initializes (an error if explicit arguments were given); None (default) initializes when
        arguments are given or `detect_cluster()` finds a multi-process environment.
      initialization_timeout: seconds to wait for all processes to connect.

    Returns:
      True if the distributed runtime is initialized (now or before), False for a single process.
      Must run before the first JAX computation (creating an array, listing devices with a backend).
    """
    import jax

    explicit = {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                      process_id=process_id, local_device_ids=local_device_ids).items()
                if v is not None}
    if enable is False:
        if explicit:
            raise ValueError(f"distributed initialization is disabled (--nodistributed) but "
                             f"{sorted(explicit)} were given; drop one or the other")
        return False
    if jax.distributed.is_initialized():
        return True
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id must be in [0, {num_processes}) for --num_processes={num_processes}, "
                         f"got {process_id}")
    reason = "explicit arguments" if explicit else ("--distributed" if enable else detect_cluster(env))
    if reason is None:
        return False
    if explicit and coordinator_address is None and detect_cluster(env) is None:
        raise ValueError("--coordinator_address HOST:PORT (process 0's host and a free port) is needed "
                         "outside TPU/SLURM/Open MPI environments; give it with --num_processes and "
                         "--process_id")
    log.info("jax.distributed.initialize (%s): %s", reason, explicit)
    jax.distributed.initialize(**explicit, initialization_timeout=initialization_timeout)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def is_main_process() -> bool:
    """True on process 0 (the one that writes metrics, progress and summaries)."""
    import jax

    return jax.process_index() == 0


def per_process_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
    """The rows each process loads: global_batch_size / process_count (an error if not divisible)."""
    import jax

    p = jax.process_count() if process_count is None else int(process_count)
    if global_batch_size < 1 or global_batch_size % p:
        raise ValueError(f"the global batch size {global_batch_size} (config.batch_size) must be a positive "
                         f"multiple of the {p} processes; e.g. --config.batch_size={max(p, global_batch_size // p * p)}")
    return global_batch_size // p


def global_mesh(devices: Sequence[Any] | None = None, axis: str = AXIS):
    """1-D mesh named `axis` over `devices` (default `jax.devices()`: every process's devices, in
    process order, so process i's local rows are a contiguous block of the global batch)."""
    import jax

    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (axis,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))


def global_batch(batch: Mapping[str, np.ndarray], sharding: Any) -> dict:
    """Global arrays from this process's rows of every entry of `batch` (leading axis = rows):
    `jax.make_array_from_process_local_data(sharding, rows)`; the global leading size is
    rows * process_count for a batch-sharded `sharding`."""
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree: Any, sharding: Any) -> Any:
    """Puts a host tree (identical on every process) on every device of `sharding` (replicated).

    Global arrays already carrying `sharding` are passed through; other arrays are fetched to the
    host first, since a single-device array cannot be moved onto other processes' devices.
    """
    import jax

    def one(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(f"cannot replicate a global array with sharding {x.sharding}; gather it "
                                 "first (jax.experimental.multihost_utils.process_allgather)")
            x = x.addressable_data(0)  # replicated on another mesh (e.g. restored): every process has it
        return jax.device_put(np.asarray(x), sharding)

    return jax.tree_util.tree_map(one, tree)


def sync(name: str) -> None:
    """Barrier across processes (no-op for a single process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
