"""Training checkpoints with orbax: adapter + head + optimizer state + step + data position + config.

Layout: `DIR/checkpoints/<step>/{state, meta, config}` where `state` is the train state
(`{"step", "trainable": {"adapter", "head"}, "opt_state"}`; never the frozen base, so a ViT-B RLRR
checkpoint is a few MB), `meta` is JSON (`step`, `data_position` = train batches consumed,
`eval_accuracy` when evaluated, `adapter_spec` = `method.spec(params)`: the method, its resolved
hyper-parameters and the model's signature) and `config` is the run's config as JSON.

* Keep-last-N plus the best by `eval_accuracy` (orbax preservation policies).
* Atomic: orbax writes into a temporary directory and renames it when complete, so a save killed
  midway leaves the previous checkpoints restorable (the temporary directory is ignored).
* `check_adapter_spec` refuses to restore an adapter into a method with other hyper-parameters
  (e.g. LoRA's alpha, which changes no shape); checkpoints without `adapter_spec` (older ones, or
  written without a spec) are not checked.
* `restore` takes an abstract state (`jax.eval_shape` of the state builder); when the latest
  checkpoint cannot be read (corrupted, truncated) it warns and falls back to the previous one,
  moving the unreadable directory aside to `corrupted_<step>` so that step can be written again.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

log = logging.getLogger(__name__)

SPEC_KEY = "adapter_spec"  # the meta entry holding `Method.spec(params)`


class CheckpointCorruptedWarning(UserWarning):
    """The newest checkpoint could not be restored; an older one was used."""


def _accuracy(metrics: Mapping[str, Any]) -> float:
    return float(metrics["eval_accuracy"])


class Checkpointer:
    """Thin wrapper over `orbax.checkpoint.CheckpointManager` for train states.

    Args:
      directory: where the step directories go (created).
      keep: number of most recent checkpoints kept.
      keep_best: also keep the checkpoint with the best `eval_accuracy`.
      config: JSON-serializable dict written with every checkpoint.
      spec: `method.spec(params)` of the adapter in the saved states, written into every
        checkpoint's meta (`SPEC_KEY`), so a restore with other hyper-parameters is refused.
    """

    def __init__(self, directory: str, *, keep: int = 3, keep_best: bool = True,
                 config: Mapping[str, Any] | None = None, spec: Mapping[str, Any] | None = None):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.directory = os.path.abspath(directory)
        policies: list = [ocm.LatestN(n=keep)]
        if keep_best:
            policies.append(ocm.BestN(get_metric_fn=_accuracy, n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=False,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.config = dict(config or {})
        self.spec = dict(spec) if spec is not None else None

    # ----------------------------------------------------------------------------------- save
    def save(self, state: Any, *, data_position: int, eval_accuracy: float | None = None,
             extra: Mapping[str, Any] | None = None) -> bool:
        """Saves `state` at its step (int(state["step"])). Returns False if that step exists already."""
        step = int(jax.device_get(state["step"]))
        if step in self.manager.all_steps():
            return False
        meta = {"step": step, "data_position": int(data_position), **dict(extra or {})}
        if self.spec is not None:
            meta[SPEC_KEY] = self.spec
        metrics = None
        if eval_accuracy is not None:
            meta["eval_accuracy"] = float(eval_accuracy)
            metrics = {"eval_accuracy": float(eval_accuracy)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(self.config),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)
        self.manager.wait_until_finished()
        return True

    # -------------------------------------------------------------------------------- restore
    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The kept step with the highest eval accuracy (ties: the earliest), or None."""
        best, best_acc = None, -1.0
        for step in self.all_steps():
            try:
                acc = self.read_meta(step).get("eval_accuracy")
            except Exception:  # unreadable meta: not a candidate
                continue
            if acc is not None and acc > best_acc:
                best, best_acc = step, acc
        return best

    def read_meta(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def read_config(self, step: int) -> dict:
        """The config stored with checkpoint `step` (JSON)."""
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out["config"] or {})

    def restore(self, abstract_state: Any = None, step: int | None = None, *,
                check_config: Callable[[dict, int], Any] | None = None,
                check_meta: Callable[[dict, int], Any] | None = None) -> tuple[Any, dict] | None:
        """(state, meta) of `step`, or of the newest readable checkpoint when `step` is None.

        `abstract_state` (from `jax.eval_shape`) fixes the tree structure, dtypes and shardings;
        without it the arrays come back as stored (for inspection). `check_config(stored_config,
        step)` and then `check_meta(meta, step)` (e.g. `check_adapter_spec`) run before a checkpoint's
        state is read; what they raise propagates (an incompatible checkpoint is not a corrupted one).

        Returns None when there is no checkpoint. A checkpoint that fails to load is skipped with a
        `CheckpointCorruptedWarning` naming it (only when `step` is None; an explicit step raises) and
        moved aside to `corrupted_<step>`, also when none is readable (the run then starts afresh and
        can save every step again).
        """
        steps = [step] if step is not None else list(reversed(self.all_steps()))
        for i, s in enumerate(steps):
            try:
                stored = self.read_config(s) if check_config is not None else None
                meta = self.read_meta(s) if check_meta is not None else None
            except Exception as e:  # noqa: BLE001 - an unreadable config means "unreadable"
                if step is not None:
                    raise
                self._warn_unreadable(s, e, steps[i + 1:])
                continue
            if check_config is not None:
                check_config(stored, s)
            if check_meta is not None:
                check_meta(meta, s)
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                if abstract_state is None:
                    out = {"state": jax.device_get(out["state"]), "meta": out["meta"]}
                state, meta = out["state"], dict(out["meta"])
                if int(jax.device_get(state["step"])) != s or meta.get("step") != s:
                    raise ValueError(f"checkpoint {s} holds step {meta.get('step')}")
                self._set_aside(steps[:i])
                return state, meta
            except Exception as e:  # noqa: BLE001 - any failure means "unreadable"
                if step is not None:
                    raise
                self._warn_unreadable(s, e, steps[i + 1:])
        if step is None:
            self._set_aside(steps)
        return None

    def _warn_unreadable(self, step: int, error: Exception, older: list[int]) -> None:
        msg = (f"checkpoint at step {step} in {self.directory} could not be restored "
               f"({type(error).__name__}: {str(error)[:300]})")
        if older:
            msg += f"; falling back to step {older[0]}"
        else:
            msg += ("; no readable checkpoint left: the unreadable ones are moved aside to corrupted_<step> "
                    "and the run starts from scratch")
        warnings.warn(msg, CheckpointCorruptedWarning, stacklevel=3)
        log.warning(msg)

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable step directories to `corrupted_<step>[_n]` (kept for inspection), so
        the resumed run can write those steps again."""
        for s in steps:
            src = os.path.join(self.directory, str(s))
            if not os.path.isdir(src) or jax.process_index() != 0:
                continue
            dst, n = os.path.join(self.directory, f"corrupted_{s}"), 0
            while os.path.exists(dst):
                n += 1
                dst = os.path.join(self.directory, f"corrupted_{s}_{n}")
            os.replace(src, dst)
            log.warning("moved the unreadable checkpoint %s to %s", src, dst)
        if steps:
            self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_adapter_spec(meta: Mapping[str, Any], method: Any, params: Any = None, *, where: str = "",
                       fix: str = "") -> None:
    """Raises `SpecMismatchError` when checkpoint `meta` records (`SPEC_KEY`) an adapter built with
    another method, other hyper-parameters or (with `params`) another model than `method`; the
    message names each field with its stored and requested value, then `fix`. Meta without a
    recorded spec (checkpoints written before specs were stored) passes unchecked."""
    from jax_peft.methods.base import SpecMismatchError

    spec = meta.get(SPEC_KEY)
    if not spec:
        return
    try:
        method.check_spec(spec, params)
    except SpecMismatchError as e:
        raise SpecMismatchError(e.method, e.fields, e.spec, where=where, fix=fix) from None


def config_to_json(config: Any) -> dict:
    """A JSON-safe dict of an ml_collections config (or any mapping)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=str))
