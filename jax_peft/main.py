"""Command line: `python -m jax_peft.main --config jax_peft.configs.<name>[:arg] --workdir DIR`.

`--config` takes a module (`jax_peft.configs.vtab1k:cifar100,rlrr`, or any importable module with a
`get_config`) or a config file path (`my_config.py[:arg]`).

Config fields are overridden with flags such as `--config.method.rank=16` or
`--config.total_steps=300` (unknown keys fail with the list of valid ones). `--config.mode` picks
`train` (default; resumes from DIR's newest checkpoint), `eval` (evaluates the latest or best
checkpoint, `--config.restore_from`) or `export` (writes DIR/merged.npz, or `--export_path`).

SIGTERM or Ctrl-C saves a checkpoint after the current step and exits with status 0 (a second
Ctrl-C aborts at once, status 130); the same command resumes.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config: a module (jax_peft.configs.<name>[:arg]) or a file (path.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and summary.json.")
_EXPORT_PATH = flags.DEFINE_string("export_path", None, "mode=export: output .npz (default DIR/merged.npz).")
# Multi-process runs (names as in jax.distributed.initialize; docs/distributed.md).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Force (--distributed) or forbid (--nodistributed) jax.distributed.initialize; "
    "default: initialize when the flags above are given or TPU/SLURM/Open MPI markers show several processes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from jax_peft import host

    if host.requested():  # unless JAX_PEFT_REUSE_FREED_MEMORY=0; before JAX's CPU backend starts (jax_peft/host.py)
        host.keep_freed_memory()
    from jax_peft.train import distributed, loop  # imported after flag parsing (JAX flags such as XLA_FLAGS)

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           enable=_DISTRIBUTED.value)
    config, workdir = _CONFIG.value, _WORKDIR.value
    early = signal.getsignal(signal.SIGTERM)
    if config.mode != "train" and getattr(early, "requested", False):
        return 0  # terminated before starting: nothing to save
    from jax_peft.download import DownloadError

    try:
        if config.mode == "train":
            out = loop.train_and_evaluate(config, workdir)
        elif config.mode == "eval":
            out = loop.evaluate(config, workdir)
        elif config.mode == "export":
            out = {"merged_checkpoint": loop.export(config, workdir, _EXPORT_PATH.value)}
        else:
            raise app.UsageError(f"unknown --config.mode={config.mode!r}; use train, eval or export")
    except DownloadError as e:  # one line with the CLI's fix instead of a traceback
        sys.stderr.write(download_failure_message(e, config.model.checkpoint) + "\n")
        return 1
    print(json.dumps(out, indent=2))
    return 0


def download_failure_message(error: Any, checkpoint: str) -> str:
    """The CLI's one-line message for a failed checkpoint download (a `DownloadError`)."""
    url = error.url or checkpoint
    name = url.rstrip("/").rsplit("/", 1)[-1] or "checkpoint.npz"
    where = f", or put the file at {error.dest}" if error.dest is not None else ""
    what = url if checkpoint == url else f"checkpoint {checkpoint!r} from {url}"
    return (f"error: cannot download {what} ({error.reason or error}). "
            f"Download it elsewhere (e.g. curl -L -o {name} {url}) and pass "
            f"--config.model.checkpoint=/path/to/{name}{where}.")


class _EarlySigterm:
    """SIGTERM handler for the time before the training loop installs its own (imports, flag parsing,
    compilation): it records the signal, and the loop (which sees it as the previous handler through
    its `requested` attribute) then stops cleanly before the first step."""

    requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True


def _unknown_override(argv: list[str]) -> str | None:
    """An error message for the first `--config.a.b=...` override whose key is not in the config
    (listing the valid keys at that level), or None. ml_collections' own error names the key only."""
    import importlib.util

    import ml_collections

    spec_arg, overrides = None, []
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            spec_arg = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            spec_arg = argv[i + 1]
        elif a.startswith("--config."):
            overrides.append(a[len("--config."):].split("=", 1)[0])
    if not spec_arg or not overrides:
        return None
    path, _, arg = spec_arg.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_jax_peft_config_check", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(arg) if arg else module.get_config()
    except Exception:  # noqa: BLE001 - config_flags reports problems with the file itself
        return None
    for key in overrides:
        node, walked = config, []
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict):
                break
            if part not in node:
                where = f"config.{'.'.join(walked)}" if walked else "the config"
                valid = ", ".join(sorted(node.keys()))
                return f"unknown config key --config.{key}: {where} has no {part!r}. Valid keys: {valid}"
            node, walked = node[part], walked + [part]
    return None


def _resolve_config_argv(argv: list[str]) -> list[str]:
    """argv with a module `--config` value replaced by its file (ml_collections loads files)."""
    from jax_peft.train.config import resolve_config

    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + resolve_config(a.split("=", 1)[1])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
    return out


def run() -> None:
    early = _EarlySigterm()
    signal.signal(signal.SIGTERM, early)
    try:
        sys.argv = _resolve_config_argv(sys.argv)
    except ValueError as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(2)
    message = _unknown_override(sys.argv[1:])
    if message:
        sys.stderr.write(message + "\n")
        sys.exit(2)
    from jax_peft.train.safety import RunRefusedError

    try:
        app.run(main)
    except RunRefusedError as e:  # the workdir or its checkpoints refuse this run: the message is the fix
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second Ctrl-C during it
        sys.stderr.write("\naborted by Ctrl-C; checkpoints saved before are kept: rerun the same command "
                         "to resume from the newest\n")
        sys.exit(130)


if __name__ == "__main__":
    run()
