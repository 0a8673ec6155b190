"""Sharding the frozen backbone over an `fsdp` mesh axis (ZeRO-3 / FSDP style, for PEFT).

A PEFT step never differentiates or updates the frozen parameters, so they need no replication:
each device holds 1/fsdp of every large frozen leaf and XLA all-gathers a leaf where a layer uses
it. The trainable state (adapter, head, optimizer state) stays replicated: it is small.

    mesh = make_mesh(data=2, fsdp=4)                    # 8 devices: axes ("data", "fsdp")
    specs = frozen_specs(frozen, mesh)                  # PartitionSpec per leaf, by path rules
    frozen = put_sharded(frozen, mesh, specs)           # each device receives only its shards

The batch is sharded over both axes (`P(("data", "fsdp"))`), so every device still works on its own
rows: `fsdp` trades memory for all-gathers, it does not change the arithmetic, and losses equal plain
data parallelism up to float32 summation order.

Rules map a regex over the leaf path (`Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel`) to
"shard" (the largest axis divisible by the fsdp size; for a scanned model's stacked leaves the depth
axis is never used, so each layer is gathered once when the scan reaches it) or "replicate". The first
matching rule wins; a leaf no rule covers is an error. Leaves smaller than `min_bytes` (biases,
norms) are replicated whatever the rule, since gathering them costs more than it saves.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_peft import paths
from jax_peft.lazy_npz import to_device

log = logging.getLogger(__name__)

DATA, FSDP = "data", "fsdp"
BATCH = P((DATA, FSDP))
DEFAULT_RULES: tuple[tuple[str, str], ...] = ((r".*", "shard"),)
DEFAULT_MIN_BYTES = 1 << 18  # 256 KiB: ViT-B's 768-wide kernels and up are sharded, vectors are not
_ACTIONS = ("shard", "replicate")


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
    """(data, fsdp) sizes for `num_devices`; `data=-1` takes what `fsdp` leaves."""
    if fsdp < 1 or num_devices % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be a positive divisor of the {num_devices} devices; "
                         f"e.g. --config.mesh.fsdp={_divisor_near(num_devices, fsdp)}")
    if data == -1:
        data = num_devices // fsdp
    if data < 1 or data * fsdp != num_devices:
        raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} must equal the {num_devices} devices; "
                         f"use --config.mesh.data=-1 to take the rest, or "
                         f"--config.mesh.data={num_devices // fsdp}")
    return data, fsdp


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def make_mesh(data: int, fsdp: int, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over `devices` (default `jax.devices()`, all processes, in process order).

    The fsdp axis is the faster-varying one, so with several processes an fsdp group stays inside a
    process when fsdp divides the local device count (gathers over fast local links)."""
    devices = list(jax.devices() if devices is None else devices)
    if data * fsdp != len(devices):
        raise ValueError(f"a {data} x {fsdp} mesh needs {data * fsdp} devices, got {len(devices)}")
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((data, fsdp), (DATA, FSDP), devices=devices, axis_types=(auto, auto))


def _check_rules(rules: Iterable[tuple[str, str]]) -> list[tuple[re.Pattern, str, str]]:
    compiled = []
    for pattern, action in rules:
        if action not in _ACTIONS:
            raise ValueError(f"sharding rule {pattern!r} -> {action!r}: the action must be one of {_ACTIONS}")
        compiled.append((re.compile(pattern), pattern, action))
    return compiled


def _largest_divisible_axis(shape: tuple[int, ...], n: int, skip: int) -> int | None:
    axes = sorted(range(skip, len(shape)), key=lambda a: (-shape[a], a))
    return next((a for a in axes if shape[a] % n == 0), None)


def leaf_spec(shape: tuple[int, ...], nbytes: int, action: str, fsdp: int, *, stacked: bool = False,
              min_bytes: int = DEFAULT_MIN_BYTES) -> P:
    """The PartitionSpec of one frozen leaf (see the module docstring)."""
    if action == "replicate" or fsdp == 1 or nbytes < min_bytes:
        return P()
    axis = _largest_divisible_axis(tuple(shape), fsdp, skip=1 if stacked and len(shape) > 1 else 0)
    if axis is None:
        return P()
    return P(*([None] * axis + [FSDP]))


def frozen_specs(tree: Mapping[str, Any], fsdp: int, rules: Iterable[tuple[str, str]] = DEFAULT_RULES, *,
                 min_bytes: int = DEFAULT_MIN_BYTES, stacked_prefix: str | None = None) -> dict:
    """PartitionSpec tree for the frozen parameters.

    Args:
      tree: the frozen parameters (arrays or `jax.ShapeDtypeStruct`s).
      fsdp: the size of the mesh's fsdp axis.
      rules: (path regex, "shard" | "replicate") pairs, first match wins; a leaf no rule matches
        raises a ValueError listing it.
      min_bytes: leaves smaller than this are replicated.
      stacked_prefix: path prefix of a scanned model's stacked blocks (leading depth axis, never sharded).
    """
    compiled = _check_rules(rules)
    flat = paths.flatten(tree)
    uncovered, specs = [], {}
    for path, leaf in flat.items():
        action = next((a for rx, _, a in compiled if rx.search(path)), None)
        if action is None:
            uncovered.append(path)
            continue
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        stacked = stacked_prefix is not None and path.startswith(stacked_prefix)
        specs[path] = leaf_spec(tuple(leaf.shape), nbytes, action, fsdp, stacked=stacked, min_bytes=min_bytes)
    if uncovered:
        shown = ", ".join(uncovered[:5]) + (f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else "")
        raise ValueError(f"no sharding rule covers {shown}; rules: {[p for _, p, _ in compiled]}. Add a "
                         "rule such as (r'.*', 'replicate') at the end of config.mesh.rules")
    return paths.unflatten(specs)


def put_sharded(tree: Mapping[str, Any], mesh: jax.sharding.Mesh, specs: Mapping[str, Any]) -> dict:
    """Places a host tree (the same on every process) on `mesh` with `specs`; each device receives only
    its own slice (`jax.make_array_from_callback`), so no device ever holds a whole sharded leaf. A
    lazily loaded leaf (`load_checkpoint(..., lazy=True)`) is read slice by slice from its file, so the
    host never holds it whole either (`jax_peft.lazy_npz.to_device`)."""
    return jax.tree_util.tree_map(lambda x, spec: to_device(x, NamedSharding(mesh, spec)), tree, specs,
                                  is_leaf=lambda s: isinstance(s, P))


def load_sharded(path_or_url: str, mesh: jax.sharding.Mesh, rules: Iterable[tuple[str, str]] = DEFAULT_RULES, *,
                 min_bytes: int = DEFAULT_MIN_BYTES, **load_kwargs: Any) -> dict:
    """`load_checkpoint` streamed onto `mesh`: leaves sharded over its fsdp axis by `rules` (see
    `frozen_specs`; replicated on a mesh without one), each device reading only its slice of the file.

    `load_kwargs` go to `jax_peft.load_checkpoint` (config=, head=, dtype=, ...)."""
    from jax_peft.checkpoint import load_checkpoint

    params = load_checkpoint(path_or_url, lazy=True, **load_kwargs)
    specs = frozen_specs(params, dict(mesh.shape).get(FSDP, 1), rules, min_bytes=min_bytes)
    return put_sharded(params, mesh, specs)


def bytes_per_device(tree: Any) -> dict[str, int]:
    """Bytes of `tree` that each addressable device holds (from the arrays' shards)."""
    out: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            key = str(shard.device)
            out[key] = out.get(key, 0) + shard.data.nbytes
    return out
