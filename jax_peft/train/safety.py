"""Guards of the training loop against silent wrong answers and lost runs.

* `check_workdir`: the workdir is a directory we can write, said in one line before any work.
* `WorkdirLock`: one run per workdir (`DIR/run.lock` holds the holder's host, pid and start time;
  released on exit; a lock left by a dead process on this host is detected, explained and taken over).
* `check_resume_config`: a checkpoint is resumed only by the config that wrote it; fields that define
  the run must match, a few safe ones may change with `--config.resume_override=field,...`.
* `FiniteGuard`: device-side flags of every step (finite loss, gradients and parameters; labels in
  range), read in one transfer before every save, eval and log, so a non-finite state is never saved
  and there is no extra host sync per step.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

LOCK_NAME = "run.lock"

# Config fields that change nothing the run computes: ignored on resume.
FREE_ON_RESUME = ("progress", "mode", "restore_from", "export_merged", "log_every", "checkpoint_every",
                  "keep_checkpoints", "keep_best", "resume_override", "data.prefetch", "data.data_dir",
                  "data.cache", "data.cache_dir", "data.cache_max_gb", "data.worker_processes",
                  "model.remat",
                  # the device mesh: checkpoints hold the replicated trainable state only and restore
                  # onto any mesh (like the device count, which is not in the config either)
                  "mesh.data", "mesh.fsdp", "mesh.rules", "mesh.min_bytes")
# Fields that may change on resume when named in `--config.resume_override` (they change the
# schedule length, the evaluation or the numerics' rounding, not what is being trained).
OVERRIDABLE_ON_RESUME = ("total_steps", "num_epochs", "eval_every", "data.eval_split", "parallel",
                         "compute_dtype", "model.scan")


class RunRefusedError(RuntimeError):
    """The run cannot start in this workdir as configured; the message names the problem and the fix."""


class IncompatibleCheckpointError(RunRefusedError):
    """The workdir's checkpoints were written by a run with another config (not a corruption)."""


class WorkdirLockedError(RunRefusedError):
    """Another run holds the workdir's lock."""


# ------------------------------------------------------------------------------------- workdir
def check_workdir(workdir: str) -> str:
    """Creates `workdir` if needed and checks that files can be written in it; returns its absolute
    path. Raises RunRefusedError with one line naming the problem otherwise."""
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunRefusedError(f"--workdir {path} is a file, not a directory; pass a directory path "
                              "(it is created when missing)")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunRefusedError(f"--workdir {path} is not writable ({e.strerror or e}); pass a directory you "
                              "can write to") from None
    return path


def check_writable(path: str) -> None:
    """Raises RunRefusedError if the file `path` cannot be written (checked before long work, so its
    result is not lost at the end)."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    try:
        fd, probe = tempfile.mkstemp(dir=d, prefix=".write_probe.")
        os.close(fd)
        os.unlink(probe)
        if os.path.isdir(path):
            raise IsADirectoryError(21, "a directory of that name exists")
    except OSError as e:
        raise RunRefusedError(f"cannot write {path} ({e.strerror or e}); make its directory writable "
                              "or choose another location") from None


# ---------------------------------------------------------------------------------------- lock
def _start_time(pid: int) -> str | None:
    """The process start time in clock ticks since boot (Linux), to tell a reused pid; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: Mapping[str, Any]) -> bool | None:
    """True / False for a holder on this host, None when it runs on another host (cannot tell)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    started = holder.get("start_time")
    return not (started and _start_time(pid) not in (None, started))


class WorkdirLock:
    """Exclusive lock on a workdir: `DIR/run.lock` created with O_EXCL, holding JSON {host, pid,
    start_time, since}. A second run refuses at once; a lock whose process is gone (same host) is
    reported as stale and taken over. Use as a context manager; released on exit."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.held = False

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def acquire(self) -> WorkdirLock:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                alive = _alive(holder) if holder else False
                who = (f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"
                       if holder else "an unreadable lock file")
                if holder.get("pid") == os.getpid() and holder.get("host") == me["host"]:
                    raise WorkdirLockedError(f"workdir {os.path.dirname(self.path)} is already in use by "
                                             "this process; use another --workdir") from None
                if alive is None:
                    raise WorkdirLockedError(
                        f"workdir {os.path.dirname(self.path)} is locked by {who}, another run on another "
                        f"host; wait for it to finish or use another --workdir. If that run is dead (its "
                        f"host crashed), delete {self.path}") from None
                if alive:
                    raise WorkdirLockedError(
                        f"workdir {os.path.dirname(self.path)} is in use by {who}, a run that is still "
                        f"running; wait for it to finish (or stop it), or use another --workdir") from None
                warnings.warn(f"{self.path}: stale lock of {who}, a process that is no longer running "
                              "(killed or crashed); taking it over", stacklevel=2)
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise WorkdirLockedError(f"could not take the lock {self.path} (other runs keep taking it); "
                                 "use another --workdir")

    def release(self) -> None:
        if self.held:
            self.held = False
            if self._holder().get("pid") == os.getpid():
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -------------------------------------------------------------------------------------- resume
def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} of a nested JSON config."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_override(value: Any) -> list[str]:
    """`resume_override` ("total_steps,eval_every" or a sequence) -> field names, validated."""
    if not value:
        return []
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    bad = [n for n in names if n not in OVERRIDABLE_ON_RESUME]
    if bad:
        raise ValueError(f"config.resume_override names {bad}, which cannot change when a run resumes; "
                         f"fields it accepts: {', '.join(OVERRIDABLE_ON_RESUME)}. To train with other "
                         "values of the other fields use a new --workdir")
    return names


def _defaults(current: Mapping[str, Any]) -> dict[str, Any]:
    """Schema defaults (and the current method's option defaults) for keys an older config lacks."""
    from jax_peft.train.checkpointing import config_to_json
    from jax_peft.train.config import default_config, method_config

    out = flatten_config(config_to_json(default_config()))
    try:
        out.update(flatten_config({"method": config_to_json(method_config(current["method"]["name"]))}))
    except Exception:  # noqa: BLE001 - no method defaults: compare as stored
        pass
    return out


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple]:
    """{field: (stored value, current value)} over the fields that are not free to change."""
    a, b = flatten_config(stored), flatten_config(current)
    missing = object()
    defaults = _defaults(current) if set(a) ^ set(b) else {}
    out = {}
    for key in sorted(set(a) | set(b)):
        if key in FREE_ON_RESUME:
            continue
        va, vb = a.get(key, missing), b.get(key, missing)
        va = defaults.get(key, missing) if va is missing else va
        vb = defaults.get(key, missing) if vb is missing else vb
        if va != vb:
            out[key] = tuple("(absent)" if v is missing else v for v in (va, vb))
    return out


def check_resume_config(stored: Mapping[str, Any], current: Mapping[str, Any], *, step: int, where: str,
                        override: list[str]) -> list[str]:
    """Raises IncompatibleCheckpointError unless `current` may resume the checkpoint of `stored`
    (every differing field is named in `override`). Returns the accepted differing fields."""
    if not stored:  # written without a config (library use): nothing to compare
        return []
    diff = config_differences(stored, current)
    refused = {k: v for k, v in diff.items() if k not in override}
    if not refused:
        return sorted(diff)
    lines = [f"the checkpoint at step {step} in {where} was written by a run with another config, so this "
             "run cannot resume it (the checkpoints are intact, not corrupted). Differing fields "
             "(checkpoint -> now):"]
    lines += [f"  {k}: {v[0]!r} -> {v[1]!r}" for k, v in refused.items()]
    fixed = [k for k in refused if k not in OVERRIDABLE_ON_RESUME]
    lines.append("Ways out: (1) train this config in a new --workdir; (2) resume the stored run with its "
                 "own values (see its config.json)")
    if not fixed:
        lines[-1] += (f"; or (3) accept these changes, which are safe when resuming, with "
                      f"--config.resume_override={','.join(sorted(set(override) | set(refused)))}")
    else:
        lines[-1] += (f". {', '.join(fixed)} define(s) the run and cannot change in this workdir "
                      f"(--config.resume_override accepts only {', '.join(OVERRIDABLE_ON_RESUME)})")
    raise IncompatibleCheckpointError("\n".join(lines))


# --------------------------------------------------------------------------------- finite guard
class FiniteGuard:
    """Collects each step's device-side flags (`metrics["finite"]`, `metrics["bad_labels"]`) without
    reading them; `check` reads all pending flags in one transfer and raises on the first bad step.

    Call `check` before every save (never save a non-finite state), eval and log; it also runs on its
    own every `max_pending` steps so the pending list stays small.
    """

    def __init__(self, get: Callable[[Any], Any], max_pending: int = 256):
        self.get = get
        self.max_pending = max_pending
        self.pending: list[tuple[int, Any, Any]] = []

    def add(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """Records step `step`'s flags; True when `check` is due (too many pending)."""
        if "finite" in metrics:
            self.pending.append((step, metrics["finite"], metrics.get("bad_labels")))
        return len(self.pending) >= self.max_pending

    def check(self, last_good: Callable[[], str]) -> None:
        """Raises FloatingPointError (non-finite) or ValueError (labels out of range) naming the
        first bad step and `last_good()` (the last finite checkpoint)."""
        if not self.pending:
            return
        steps = [p[0] for p in self.pending]
        flags = self.get([(p[1], p[2]) for p in self.pending])
        self.pending = []
        for step, (finite, bad_labels) in zip(steps, flags):
            if bad_labels is not None and int(bad_labels) > 0:
                raise ValueError(
                    f"step {step}: {int(bad_labels)} label(s) of the batch are outside [0, num_classes) of "
                    "the model's head; the loss of those examples would be wrong. Fix the dataset's labels "
                    f"or config.model.num_classes. {last_good()}")
            if not bool(finite):
                raise FloatingPointError(
                    f"the training loss, gradients or parameters became non-finite (NaN/Inf) at step {step}; "
                    "nothing from that step on was saved. Lower --config.optimizer.lr or set "
                    "--config.optimizer.grad_clip_norm (and use --config.compute_dtype=float32 if it is "
                    f"bfloat16). {last_good()}")
