"""The training loop: `train_and_evaluate(config, workdir)`, plus `evaluate` and `export`.

Files written to `workdir`:

    config.json         the run's config
    metrics.jsonl       one JSON object per logged step: step, loss, lr, accuracy (train batch),
                        grad_norm, images_per_s; plus eval_accuracy, eval_loss when evaluated
    checkpoints/<step>  orbax checkpoints (adapter + head + optimizer state + step + data position)
    summary.json        at the end: method, trainable_params, best/final eval accuracy, steps, wall time
    merged.npz          with `export_merged=True` (or mode "export"): the merged model, Google layout
    run.lock            while training: the holder's host and pid (one run per workdir, `safety.WorkdirLock`)

Resuming checks the stored config first (`safety.check_resume_config`; `config.resume_override` for
the safe fields), and no state is saved unless its step flags say finite (`safety.FiniteGuard`).

Preemption: SIGTERM (and a first Ctrl-C, SIGINT; a second one aborts) makes the loop save a checkpoint
at the current step and return cleanly (`{"preempted": True, ...}`); running the same command again
resumes from the newest checkpoint, with
the data stream repositioned (`start_batch`) and dropout keys derived from the step, so the losses
at every later step and the final adapter are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from jax_peft import paths, scan
from jax_peft.methods.base import Method, SpecMismatchError
from jax_peft.train import checkpointing, distributed, model_setup, optimizer, safety, schedules
from jax_peft.train import config as config_lib
from jax_peft.train import step as step_lib
from jax_peft.vit import ViT, ViTConfig

log = logging.getLogger(__name__)

MODES = ("train", "eval", "export")


# ------------------------------------------------------------------------------------ config
def validate_config(config: Any) -> None:
    """Checks the values (the locked schema already rejects unknown keys)."""
    choices = {
        "parallel": (config.parallel, step_lib.PARALLEL),
        "compute_dtype": (config.compute_dtype, ("float32", "bfloat16")),
        "mode": (config.mode, MODES),
        "restore_from": (config.restore_from, ("latest", "best")),
        "train_form": (config.train_form, step_lib.TRAIN_FORMS),
        "optimizer.name": (config.optimizer.name, ("adamw", "sgd")),
        "schedule.kind": (config.schedule.kind, ("cosine", "timm_epoch", "constant")),
        "schedule.step_offset": (config.schedule.step_offset, schedules.STEP_OFFSETS),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ValueError(f"config.{key}={value!r} is not valid; use one of {list(valid)}")
    if config.batch_size < 1:
        raise ValueError(f"config.batch_size must be >= 1, got {config.batch_size}")
    if config.total_steps <= 0 and config.num_epochs <= 0:
        raise ValueError("set config.total_steps > 0 or config.num_epochs > 0")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ValueError(f"config.label_smoothing must be in [0, 1), got {config.label_smoothing}")
    safety.parse_override(config.get("resume_override", ""))


# ------------------------------------------------------------------------------------- setup
@dataclasses.dataclass
class Setup:
    """Everything derived from a config before the first step."""

    config: Any
    method: Method
    vit_config: ViTConfig   # the model's config (a SwinConfig for a Swin)
    model: ViT              # or a jax_peft.Swin
    params: dict            # host base params with the fresh head (numpy; a .npz file's leaves are LazyArrays)
    trainable: dict         # {"adapter", "head"}
    frozen: dict            # params without the head
    schedule: Any
    tx: optax.GradientTransformation
    runner: step_lib.Runner
    num_classes: int
    steps_per_epoch: int
    total_steps: int

    def init_state(self) -> dict:
        return step_lib.init_state(self.trainable, self.tx)

    def device_frozen(self) -> Any:
        """The frozen tree on the devices; stacked once for a scanned model (`config.model.scan`),
        so the step does not re-stack it (methods still read the canonical per-block views)."""
        return self.runner.put_frozen(scan.stack_blocks(self.frozen) if getattr(self.vit_config, "scan", False) else self.frozen)

    def abstract_state(self) -> Any:
        # Replicated over all processes' devices when distributed (orbax restores collectively).
        dev = (jax.sharding.NamedSharding(distributed.global_mesh(), jax.sharding.PartitionSpec())
               if jax.process_count() > 1 else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        shapes = jax.eval_shape(self.init_state)
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), shapes)

    def trainable_params(self) -> int:
        return self.method.num_params(self.trainable["adapter"])


def setup(config: Any) -> Setup:
    validate_config(config)
    info = model_setup.dataset_info(config, config.data.train_split)
    num_classes = int(config.model.num_classes) if config.model.num_classes > 0 else int(info["num_classes"])
    if num_classes < int(info["num_classes"]):
        raise ValueError(f"config.model.num_classes={num_classes}, but {config.data.name} has "
                         f"{info['num_classes']} classes: labels >= {num_classes} would train nothing. Set "
                         f"--config.model.num_classes={info['num_classes']} (or -1: from the dataset)")
    method = model_setup.build_method(config)
    rng = jax.random.PRNGKey(int(config.seed))
    r_params, r_adapter = jax.random.split(rng)
    vcfg, params = model_setup.build_params(config, method, num_classes, r_params, lazy=True)
    adapter = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), method.init(r_adapter, params))
    trainable, frozen = step_lib.split_params(params, adapter)

    spe = int(config.schedule.steps_per_epoch)
    if spe <= 0:
        spe = config_lib.steps_per_epoch(info["num_examples"], config.batch_size, config.data.drop_remainder)
    total = int(config.total_steps) if config.total_steps > 0 else int(config.num_epochs) * spe
    sched = schedules.make_schedule(config.schedule, lr=float(config.optimizer.lr), total_steps=total,
                                    steps_per_epoch=spe)
    tx = optimizer.build_optimizer(config.optimizer, sched, decay_mask=method.decay_mask(trainable))
    model = model_setup.build_model(vcfg)  # a ViT, or a Swin for a Swin name / checkpoint
    runner = step_lib.make_runner(model, method, tx, seed=int(config.seed),
                                  label_smoothing=float(config.label_smoothing), parallel=config.parallel,
                                  schedule=sched, train_form=config.train_form,
                                  mesh=(int(config.mesh.data), int(config.mesh.fsdp)),
                                  shard_rules=tuple(tuple(r) for r in config.mesh.rules),
                                  shard_min_bytes=int(config.mesh.min_bytes),
                                  normalization=config.data.normalization)
    if int(config.mesh.fsdp) > 1 and not vcfg.remat:
        log.warning("mesh.fsdp=%d without model.remat: the backward pass keeps every layer's gathered frozen "
                    "weights, which can cost as much memory as fsdp saves; add --config.model.remat=True "
                    "(see docs/distributed.md)", int(config.mesh.fsdp))
    distributed.per_process_batch_size(int(config.batch_size))  # config.batch_size is the global batch
    runner.check_batch_size(int(config.batch_size))
    return Setup(config, method, vcfg, model, params, trainable, frozen, sched, tx, runner, num_classes,
                 spe, total)


# ------------------------------------------------------------------------------------ output
class _Progress:
    """One-line progress: step, loss, lr, images/s, ETA, input vs step time (stderr)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.every = 1 if self.tty else max(1, total // 20)
        self.t0 = time.perf_counter()
        self.first: tuple[int, float] | None = None  # (step, time) after the compiled first step

    def update(self, step: int, loss: float, lr: float, ips: float, t_in: float, t_step: float) -> None:
        if self.first is None and self.enabled:
            self.first = (step, time.perf_counter())
        if not self.enabled or (step % self.every and step != self.total):
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
        done, elapsed = step - self.first[0], now - self.first[1]
        rate = done / elapsed if done > 0 else (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        frac_in = t_in / max(t_in + t_step, 1e-12)
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.3e} | {ips:,.0f} img/s | "
                f"ETA {_hms(eta)} | input {100 * frac_in:.0f}% / step {100 * (1 - frac_in):.0f}%")
        sys.stderr.write(("\r" + line.ljust(110)) if self.tty else line + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(("\n" if self.tty else "") + text + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    break
    return out


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


class _Preemption:
    """Sets a flag on SIGTERM, and on a first SIGINT (Ctrl-C) while Python's default SIGINT handler is
    in place; a second SIGINT raises KeyboardInterrupt as usual (main thread only). Restores the
    previous handlers on exit."""

    def __init__(self):
        self.requested = False
        self.signal_name = "SIGTERM"
        self._previous = None
        self._previous_int = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            # A SIGTERM recorded by an earlier handler (the CLI's, during imports) counts too.
            self.requested = bool(getattr(self._previous, "requested", False))
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored / taken over
                self._previous_int = signal.signal(signal.SIGINT, self._handle_int)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def _handle_int(self, signum, frame):
        if self.requested:  # second Ctrl-C: abort without saving
            signal.default_int_handler(signum, frame)
        self.requested, self.signal_name = True, "Ctrl-C (SIGINT)"
        sys.stderr.write("\nCtrl-C: saving a checkpoint after this step, then stopping "
                         "(press Ctrl-C again to abort without saving)\n")
        sys.stderr.flush()

    def agree(self) -> None:
        """Multi-process runs: stop when any process got the signal, so all save the same step
        (orbax saves are collective). A no-op for a single process."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(self.requested))
            self.requested = bool(np.any(flags))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)


# -------------------------------------------------------------------------------------- eval
def run_eval(s: Setup, state: Any, frozen: Any, split: str | None = None) -> dict:
    """Accuracy and mean loss of the device-placed `state` over one pass of `split`."""
    split = split or s.config.data.eval_split
    totals = {"correct": 0.0, "count": 0.0, "loss_sum": 0.0}
    params = s.runner.merge(state, frozen)  # the adapter merged once per pass, not once per batch
    for batch in model_setup.make_dataset(s.config, split, train=False):
        out = s.runner.get(s.runner.eval(params, s.runner.put_batch(batch)))
        for k in totals:
            totals[k] += float(out[k])
    n = max(totals["count"], 1.0)
    return {"eval_accuracy": totals["correct"] / n, "eval_loss": totals["loss_sum"] / n,
            "eval_examples": int(totals["count"])}


# ------------------------------------------------------------------------------------- train
def train_and_evaluate(config: Any, workdir: str, *, stop_at: int | None = None) -> dict:
    """Trains `config` in `workdir` (resuming from its newest checkpoint) and returns the summary.

    Returns the dict written to `workdir/summary.json`, or `{"preempted": True, "step": ...}` when a
    SIGTERM or a first Ctrl-C stopped the run (a checkpoint at that step was saved; rerun to
    resume). `stop_at=k` stops the same way once step k is done (a programmatic preemption, e.g. for time budgets).
    A SIGTERM during set-up (loading, compiling) returns the same way before the first step.
    """
    with _Preemption() as pre:
        workdir = safety.check_workdir(workdir)  # one line before any work (file, not writable)
        with _workdir_lock(workdir):
            return _train(config, workdir, pre, stop_at)


def _workdir_lock(workdir: str) -> Any:
    """The workdir's exclusive lock (`safety.WorkdirLock`), taken by process 0 of a run."""
    import contextlib

    return safety.WorkdirLock(workdir) if distributed.is_main_process() else contextlib.nullcontext()


def _resume_check(config: Any, ckpt: checkpointing.Checkpointer, cfg_json: dict,
                  override: Any = None) -> Callable[[dict, int], None]:
    """`check(stored_config, step)` for `Checkpointer.restore`: refuses
    (`safety.IncompatibleCheckpointError`) a checkpoint written with another run-defining config;
    fields named in `override` (default `config.resume_override`) may differ (logged)."""
    override = safety.parse_override(config.get("resume_override", "") if override is None else override)
    logged: set[int] = set()

    def check(stored: dict, step: int) -> None:
        accepted = safety.check_resume_config(stored, cfg_json, step=step, where=ckpt.directory,
                                              override=override)
        if accepted and step not in logged:
            logged.add(step)
            log.warning("resuming step %d with changed %s (config.resume_override)", step, ", ".join(accepted))

    return check


def _spec_check(s: Setup, where: str) -> Callable[[dict, int], None]:
    """`check(meta, step)` for `Checkpointer.restore`: refuses (`safety.IncompatibleCheckpointError`)
    a checkpoint whose adapter was recorded (`checkpointing.SPEC_KEY`) with other hyper-parameters
    or another model than this config builds (e.g. a changed default), naming each field with its
    stored and requested value and the config overrides that restore it. Checkpoints written
    before specs were recorded pass unchecked."""
    public = {field: alias for alias, field in type(s.method).hparam_aliases.items()}
    hparams = s.method.hparams()

    def check(meta: dict, step: int) -> None:
        try:
            checkpointing.check_adapter_spec(meta, s.method, s.params)
        except SpecMismatchError as e:
            flags = [f"--config.method.{public.get(k, k)}={v[0]!r}" for k, v in e.fields.items() if k in hparams]
            back = f"use the stored values ({' '.join(flags)})" if flags else "use the stored method and model"
            raise safety.IncompatibleCheckpointError(str(SpecMismatchError(
                e.method, e.fields, e.spec, where=f"the checkpoint at step {step} in {where}",
                fix=f"ways out: (1) {back}; (2) train this config in a new --workdir"))) from None

    return check


def _newest_config_check(ckpt: checkpointing.Checkpointer, check: Callable[[dict, int], None]) -> None:
    """Runs `check` on the config of the newest checkpoint whose config is readable (unreadable ones
    are left to `Checkpointer.restore`, which sets them aside)."""
    for step in reversed(ckpt.all_steps()):
        try:
            stored = ckpt.read_config(step)
        except Exception:  # noqa: BLE001 - unreadable: restore handles it
            continue
        check(stored, step)
        return


def _last_good(ckpt: checkpointing.Checkpointer) -> Callable[[], str]:
    """The FiniteGuard message naming the last (finite) checkpoint of `ckpt`."""
    def message() -> str:
        step = ckpt.latest_step()
        if step is None:
            return f"No checkpoint was saved in {ckpt.directory}."
        return f"The last finite checkpoint is step {step} in {ckpt.directory} (a rerun resumes from it)."
    return message


def _train(config: Any, workdir: str, pre: _Preemption, stop_at: int | None) -> dict:
    t_start = time.perf_counter()
    cfg_json = checkpointing.config_to_json(config)
    main = distributed.is_main_process()  # process 0 writes config, metrics, progress and summary
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(config.keep_checkpoints),
                                      keep_best=bool(config.keep_best), config=cfg_json)
    check_resume = _resume_check(config, ckpt, cfg_json)
    _newest_config_check(ckpt, check_resume)  # refuse at once, before building the model
    s = setup(config)
    ckpt.spec = s.method.spec(s.params)  # recorded in every checkpoint's meta
    restored = ckpt.restore(s.abstract_state(), check_config=check_resume,  # before writing anything
                            check_meta=_spec_check(s, ckpt.directory))
    if main:
        _write_json(os.path.join(workdir, "config.json"), cfg_json)
    if restored is None:
        host_state, meta = s.init_state(), {"data_position": 0, "wall_time_s": 0.0}
    else:
        host_state, meta = restored
    start = int(jax.device_get(host_state["step"]))
    runner = s.runner
    state, frozen = runner.put_state(host_state), s.device_frozen()

    # metrics.jsonl: keep the records up to the restored step (later ones are recomputed).
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    history = [r for r in _read_jsonl(metrics_path) if r.get("step", 0) <= start]
    if main:
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
        os.replace(metrics_path + ".tmp", metrics_path)
    evals = [r for r in history if "eval_accuracy" in r]
    best = max((r["eval_accuracy"] for r in evals), default=None)
    last_eval = evals[-1] if evals else None

    progress = _Progress(s.total_steps, start, bool(config.progress) and main)
    if start:
        progress.message(f"resuming from step {start} ({ckpt.directory})")
    progress.message(f"{s.method.name}: {s.trainable_params():,} trainable parameters (+ head "
                     f"{paths.count(s.trainable['head']):,}); {s.total_steps} steps of batch {config.batch_size} "
                     f"on {runner.num_devices} device(s), parallel={runner.kind}")

    data = model_setup.make_dataset(config, config.data.train_split, train=True,
                                    start_batch=int(meta.get("data_position", start)))
    for note in getattr(data, "notes", ()):  # the decoded cache's size and place (jax_peft.data.cache)
        progress.message(note)
    wall_before = float(meta.get("wall_time_s", 0.0))
    log_every, eval_every = max(int(config.log_every), 1), int(config.eval_every)
    ckpt_every = int(config.checkpoint_every)
    preempted = False
    step = start
    guard = safety.FiniteGuard(runner.get)
    last_good = _last_good(ckpt)
    timing = {"input_wait_s": 0.0, "eval_s": 0.0, "loop_s": 0.0}  # this run's share of waiting for input
    t_loop = time.perf_counter()
    with open(metrics_path if main else os.devnull, "a") as mfile:
        pre.agree()
        preempted = pre.requested and step < s.total_steps  # signalled during set-up
        while step < s.total_steps and not preempted:
            t0 = time.perf_counter()
            batch = runner.put_batch(next(data))
            t1 = time.perf_counter()
            timing["input_wait_s"] += t1 - t0
            state, metrics = runner.train(state, frozen, batch)
            step += 1
            if guard.add(step, metrics):
                guard.check(last_good)
            last = step == s.total_steps
            if stop_at is not None and step >= stop_at:
                pre.requested = True
            pre.agree()
            do_eval = last or (eval_every > 0 and step % eval_every == 0)
            do_log = do_eval or last or step % log_every == 0 or step == start + 1
            record = None
            if do_log:
                m = runner.get(metrics)
                t2 = time.perf_counter()
                ips = int(config.batch_size) / max(t2 - t0, 1e-9)
                lr = float(m["lr"])
                record = {"step": step, "loss": float(m["loss"]), "lr": lr, "accuracy": float(m["accuracy"]),
                          "grad_norm": float(m["grad_norm"]), "images_per_s": ips}
                progress.update(step, record["loss"], lr, ips, t1 - t0, t2 - t1)
                if not math.isfinite(record["loss"]):
                    mfile.write(json.dumps(record) + "\n")
            if do_log:  # the log synced already; the flags of the steps since the last check
                guard.check(last_good)
            if do_eval:
                t_eval = time.perf_counter()
                ev = run_eval(s, state, frozen)
                timing["eval_s"] += time.perf_counter() - t_eval
                record.update(ev)
                last_eval = record
                improved = best is None or ev["eval_accuracy"] > best
                best = ev["eval_accuracy"] if improved else best
                progress.message(f"step {step}: eval_accuracy {ev['eval_accuracy']:.4f} "
                                 f"(best {best:.4f}) on {ev['eval_examples']} {config.data.eval_split} examples")
            else:
                improved = False
            if record is not None:
                mfile.write(json.dumps(record) + "\n")
                mfile.flush()
            save = last or pre.requested or (ckpt_every > 0 and step % ckpt_every == 0) or \
                (improved and bool(config.keep_best))
            if save:
                guard.check(last_good)  # never save a non-finite state
                wall = wall_before + time.perf_counter() - t_start
                _save(ckpt, runner.get_state(state), step, record["eval_accuracy"] if do_eval else None, wall)
            if pre.requested and not last:
                preempted = True
                break
    timing["loop_s"] = time.perf_counter() - t_loop - timing["eval_s"]
    progress.close()
    ckpt.close()
    if preempted:
        if step == start:
            progress.message(f"{pre.signal_name} before the first step (at step {step}); nothing new to save; "
                             "rerun to resume")
        else:
            progress.message(f"{pre.signal_name}: saved a checkpoint at step {step} in {ckpt.directory}; "
                             "rerun the same command to resume")
        return {"preempted": True, "step": step}

    wall = wall_before + time.perf_counter() - t_start
    summary = {
        "method": s.method.name,
        "trainable_params": s.trainable_params(),
        "trainable_params_with_head": s.trainable_params() + paths.count(s.trainable["head"]),
        "best_eval_accuracy": best,
        "final_eval_accuracy": last_eval["eval_accuracy"] if last_eval else None,
        "eval_split": config.data.eval_split,
        "steps": step,
        "wall_time_s": wall,
        "num_devices": runner.num_devices,
        "parallel": runner.kind,
        # time blocked on the next batch (+ its transfer) in this run's training steps, and its share
        # of the training loop's time (evaluations excluded)
        "input_wait_s": timing["input_wait_s"],
        "input_wait_fraction": timing["input_wait_s"] / max(timing["loop_s"], 1e-9),
    }
    if config.export_merged:
        summary["merged_checkpoint"] = export_state(s, runner.get_state(state), os.path.join(workdir, "merged.npz"))
    if main:
        _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def _save(ckpt: checkpointing.Checkpointer, state: Any, step: int, eval_accuracy: float | None,
          wall: float) -> None:
    """Saves the (checked finite) state at `step`; a step directory that already exists means the
    run could not save what it trained, which is an error, never a silent skip."""
    if not ckpt.save(state, data_position=step, eval_accuracy=eval_accuracy, extra={"wall_time_s": wall}):
        raise RuntimeError(
            f"cannot save step {step}: {os.path.join(ckpt.directory, str(step))} already exists but was "
            "not restored (another run wrote it?). Move it away (or use a new --workdir) and rerun")


# ------------------------------------------------------------------------------ eval / export
def _restore(s: Setup, workdir: str) -> tuple[Any, dict]:
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(s.config.keep_checkpoints),
                                      keep_best=bool(s.config.keep_best))
    step = ckpt.best_step() if s.config.restore_from == "best" else None
    if s.config.restore_from == "best" and step is None:
        raise FileNotFoundError(f"no evaluated checkpoint in {ckpt.directory}; use --config.restore_from=latest")
    # A checkpoint of another model or method is refused, never taken for a corrupted one; the
    # schedule-length and evaluation fields do not matter here.
    check = _resume_check(s.config, ckpt, checkpointing.config_to_json(s.config), safety.OVERRIDABLE_ON_RESUME)
    out = ckpt.restore(s.abstract_state(), step, check_config=check, check_meta=_spec_check(s, ckpt.directory))
    ckpt.close()
    if out is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first (--config.mode=train)")
    return out


def evaluate(config: Any, workdir: str, *, split: str | None = None) -> dict:
    """Evaluates the latest (or best, `config.restore_from`) checkpoint of `workdir` on `split`
    (default `config.data.eval_split`); writes and returns `workdir/eval_<split>.json`."""
    split = split or config.data.eval_split
    path = os.path.join(workdir, f"eval_{split.replace('/', '_')}.json")
    if jax.process_index() == 0:
        safety.check_writable(path)  # before the evaluation, so its result is never lost
    s = setup(config)
    state, meta = _restore(s, workdir)
    ev = run_eval(s, s.runner.put_state(state), s.device_frozen(), split)
    out = {"step": int(meta["step"]), "split": split, **ev}
    if jax.process_index() == 0:
        _write_json(path, out)
    return out


def export_state(s: Setup, state: Any, path: str) -> str:
    """Writes the merged model of a train state (process 0 writes): a ViT as a Google-layout `.npz`, a
    Swin as `.safetensors` / `.pth` in timm's layout (`jax_peft.save_checkpoint`).

    A ViT `.npz` is streamed: each merged leaf is computed (its frozen leaf read from the checkpoint
    file, its site's edit applied) just before it is written, so the host holds about one leaf, not
    the model (`jax_peft.merge(..., lazy=True)`). A Swin is merged whole, then written."""
    from jax_peft import checkpoint as ck
    from jax_peft.merge import merge

    trainable = jax.device_get(state["trainable"])
    if distributed.is_main_process():
        # Merged on the host's CPU backend from the host copy of the frozen tree: no accelerator has to
        # hold a whole (possibly fsdp-sharded) model, and nothing is gathered from the devices.
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            params = step_lib.join_params(s.frozen, trainable)
            stream = isinstance(s.vit_config, ViTConfig) and os.fspath(path).endswith(".npz")
            merged = merge(params, s.method, trainable["adapter"], lazy=stream)
            ck.save_checkpoint(path, merged if stream else jax.device_get(merged))
    distributed.sync("export_state")  # the file exists on every process's return
    return path


def export(config: Any, workdir: str, path: str | None = None) -> str:
    """Merges the latest (or best) checkpoint of `workdir` into `path` (default `workdir/merged.npz`;
    a Swin: `workdir/merged.safetensors`, timm's layout)."""
    swin = model_setup.swin_name(config.model.name) is not None
    path = path or os.path.join(workdir, "merged.safetensors" if swin else "merged.npz")
    if distributed.is_main_process():
        safety.check_writable(path)  # before the merge
    s = setup(config)
    if path == os.path.join(workdir, "merged.npz") and not isinstance(s.vit_config, ViTConfig):
        path = os.path.join(workdir, "merged.safetensors")  # a Swin checkpoint without a Swin name
        if distributed.is_main_process():
            safety.check_writable(path)
    state, _ = _restore(s, workdir)
    return export_state(s, state, path)
