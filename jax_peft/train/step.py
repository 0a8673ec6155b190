"""Jitted train and eval steps, data parallel over all devices (`jit` + NamedSharding, or `pmap`).

Train state (a plain dict, what the checkpoints hold)::

    {"step": int32 (), "trainable": {"adapter": ..., "head": {"kernel", "bias"}}, "opt_state": ...}

The frozen base parameters (`params` without `head`) are a separate argument that is never
differentiated and never donated; the state is donated. Dropout keys are
`fold_in(PRNGKey(seed), step)`, so a resumed run draws the same masks as an uninterrupted one.

Training runs each method in its cheaper form (`train_form="auto"`): activation form for FacT,
EFFT and LoRA (low-rank side paths beside the frozen kernels, with the official dropout placement,
no full-size weight gradient), weight form (`method.apply`) for the others. Eval always uses the
weight form, merged once per evaluation pass (`Runner.merge`), then a plain forward per batch. Mixed precision: build the model with `ViTConfig.dtype="bfloat16"`; the parameters,
gradients and optimizer state stay float32 and the loss is computed from float32 logits.

`parallel="jit"`: one `jax.jit` step over `jax.make_mesh((n,), ("data",))`; the batch is sharded
along its first axis (`P("data")`), the state and frozen parameters are replicated (`P()`); XLA adds
the gradient all-reduce. With `jax_threefry_partitionable` (the default), random draws do not depend
on the sharding, so 1 and n devices see the same dropout masks.

`parallel="pmap"`: `jax.pmap` over the same devices with an explicit `lax.pmean` of the gradients
and losses. Without dropout it matches `jit`; with dropout each device folds its index into the key,
so the masks (not their distribution) differ from `jit`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_peft import scan
from jax_peft.data.preprocess import normalize_on_device
from jax_peft.methods.activation import forward, supports_activation_form
from jax_peft.methods.base import Method
from jax_peft.train import distributed, sharding

Tree = Any
PARALLEL = ("jit", "pmap")
AXIS = "data"


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy (B,), with PyTorch's label smoothing:
    target = (1 - a) one_hot + a / C."""
    num_classes = logits.shape[-1]
    check_labels(labels, num_classes)
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _raise_bad_labels(labels: np.ndarray, num_classes: int) -> None:
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"labels outside [0, {num_classes}) at batch position(s) {bad[:8].tolist()} (values "
            f"{labels.reshape(-1)[bad[:8]].tolist()}): one_hot would make their loss silently zero. Fix the "
            "dataset's labels or the model's number of classes")


def check_labels(labels: Any, num_classes: int) -> None:
    """Refuses labels outside [0, num_classes): at once for concrete labels, and inside jitted code
    when JAX's debug checks are on (`jax.config.update("jax_enable_checks", True)`, a host callback).
    (The training loop checks every step on the device anyway: `step_flags`.)"""
    if not isinstance(labels, jax.core.Tracer):
        _raise_bad_labels(labels, num_classes)
    elif jax.config.jax_enable_checks:
        jax.debug.callback(_raise_bad_labels, labels, num_classes)


def split_params(params: Mapping[str, Any], adapter: Tree) -> tuple[dict, dict]:
    """(trainable, frozen): `{"adapter": adapter, "head": params["head"]}` and params minus the head."""
    if "head" not in params:
        raise ValueError("params have no 'head'; reset it first (jax_peft.train.model_setup.build_params)")
    frozen = {k: v for k, v in params.items() if k != "head"}
    return {"adapter": adapter, "head": params["head"]}, frozen


def join_params(frozen: Mapping[str, Any], trainable: Mapping[str, Any]) -> dict:
    """Base parameter tree with the trained head (the adapter is applied separately)."""
    return {**frozen, "head": trainable["head"]}


def init_state(trainable: Tree, tx: optax.GradientTransformation) -> dict:
    """The state at step 0 (host-independent jax arrays; built in one compiled call)."""
    return jax.jit(lambda t: {"step": jnp.zeros((), jnp.int32), "trainable": t, "opt_state": tx.init(t)})(trainable)


TRAIN_FORMS = ("auto", "weight", "activation")


def input_images(images: jax.Array, normalization: str | None) -> jax.Array:
    """The model input of a batch's "image": uint8 images normalized on the device by `normalization`
    (`preprocess.normalize_on_device`); float images (already normalized) unchanged."""
    if images.dtype != jnp.uint8:
        return images
    if normalization is None:
        raise ValueError("the batch holds uint8 images but the step was built without their normalization; "
                         "pass make_runner(..., normalization=config.data.normalization) (or "
                         "normalization= to make_train_fn / make_eval_fn), or feed float32 images "
                         "normalized on the host (make_dataset(..., normalize=True))")
    return normalize_on_device(images, normalization)


def use_activation_form(method: Method, train_form: str = "auto") -> bool:
    """Whether training runs the method in activation form (low-rank side paths beside the frozen
    kernels, with the official activation dropout) rather than in weight form (`method.apply`).
    "auto": activation form for the methods that have one (FacT, EFFT, LoRA)."""
    if train_form not in TRAIN_FORMS:
        raise ValueError(f"unknown train_form {train_form!r}; use one of {TRAIN_FORMS}")
    if train_form == "weight":
        return False
    supported = supports_activation_form(method)
    if train_form == "activation" and not supported:
        raise ValueError(f"method {method.name!r} has no activation form; use train_form='weight' or 'auto'")
    return supported


def make_train_fn(model: Any, method: Method, tx: optax.GradientTransformation, *, seed: int,
                  label_smoothing: float = 0.0, axis_name: str | None = None,
                  schedule: Callable | None = None, train_form: str = "auto",
                  normalization: str | None = None) -> Callable:
    """`train(state, frozen, batch) -> (state, metrics)` (un-jitted). Metrics: loss, accuracy,
    grad_norm, and lr (the rate this update used) when `schedule` is given. `train_form` picks the
    weight or activation form of the method (`use_activation_form`); `normalization` is that of
    uint8 batch images (`input_images`)."""
    activation = use_activation_form(method, train_form)

    def train(state: dict, frozen: Tree, batch: Mapping[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        form = "activation" if activation else "weight"
        images = input_images(batch["image"], normalization)

        def loss_fn(trainable):
            # rng is split into the model's dropout key and the method's key (EFFT factor dropout).
            logits = forward(model, method, join_params(frozen, trainable), trainable["adapter"],
                             images, train=True, rng=rng, form=form)
            loss = _masked_mean(cross_entropy(logits, batch["label"], label_smoothing), weights, count)
            return loss, logits

        # A padded last batch (data.drop_remainder=False) carries "mask": the loss is the mean over
        # its real examples, as PyTorch's drop_last=False. Under pmap each device divides by the
        # mean per-device count, so the pmean below is the global masked mean.
        weights = batch.get("mask")
        count = None if weights is None else jnp.sum(weights)
        if count is not None and axis_name is not None:
            count = jax.lax.pmean(count, axis_name)
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"])
        acc = _masked_mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32), weights, count)
        if axis_name is not None:
            grads, loss, acc = jax.lax.pmean((grads, loss, acc), axis_name)
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        new = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads)}
        metrics.update(step_flags(metrics, trainable, batch["label"], logits.shape[-1], weights, axis_name))
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
        return new, metrics

    return train


def step_flags(metrics: Mapping[str, jax.Array], trainable: Tree, labels: jax.Array, num_classes: int,
               weights: jax.Array | None = None, axis_name: str | None = None) -> dict:
    """Device-side health flags of a step (read by the loop before saving, no sync per step):
    `finite` (loss, gradient norm and the updated trainable tree finite) and `bad_labels` (count of
    real examples whose label is outside [0, num_classes))."""
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & \
        jnp.isfinite(optax.tree.norm(trainable))
    out_of_range = (labels < 0) | (labels >= num_classes)
    if weights is not None:
        out_of_range = out_of_range & (weights > 0)
    bad = jnp.sum(out_of_range.astype(jnp.int32))
    if axis_name is not None:
        bad = jax.lax.psum(bad, axis_name)
    return {"finite": finite, "bad_labels": bad}


def _masked_mean(values: jax.Array, weights: jax.Array | None, count: jax.Array | None) -> jax.Array:
    """Mean of `values` (B,), or sum(values * weights) / count for a padded batch."""
    if weights is None:
        return values.mean()
    return jnp.sum(values * weights) / jnp.maximum(count, 1.0)


def make_merge_fn(model: Any, method: Method) -> Callable:
    """`merge(state, frozen) -> params`: the weight-form parameters (`method.apply` of the adapter on
    the frozen base with the trained head) that the eval forward reads, built once per evaluation
    pass. For a scanned model `frozen` may be stacked (`jax_peft.scan`); the result is stacked."""
    scanned = bool(getattr(getattr(model, "config", None), "scan", False))

    def merge(state: dict, frozen: Tree) -> Tree:
        trainable = state["trainable"]
        params = join_params(frozen, trainable)
        if scanned and scan.STACKED in params.get("Transformer", {}):
            params = scan.unstack_blocks(params)  # the method reads the canonical per-block views
        eff = method.apply(params, trainable["adapter"])
        return scan.stack_blocks(eff) if scanned else eff

    return merge


def make_eval_fn(model: Any, *, axis_name: str | None = None, normalization: str | None = None) -> Callable:
    """`evaluate(params, batch) -> {"correct", "count", "loss_sum"}` summed over the batch, a plain
    forward of the merged `params` (`make_merge_fn`); `batch["mask"]` (optional, (B,)) marks real
    examples in a padded batch; `normalization` is that of uint8 batch images (`input_images`)."""

    def evaluate(params: Tree, batch: Mapping[str, jax.Array]):
        logits = model.apply({"params": params}, input_images(batch["image"], normalization), train=False)
        mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
        out = {
            "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
            "count": jnp.sum(mask),
            "loss_sum": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
        }
        return jax.lax.psum(out, axis_name) if axis_name is not None else out

    return evaluate


@dataclasses.dataclass
class Runner:
    """Compiled steps plus the data movement for one parallelism mode.

    `train(state, frozen, batch)` takes device-placed trees from `put_state`, `put_frozen` and
    `put_batch` (host numpy batches of the global batch size); an evaluation pass merges once,
    `params = merge(state, frozen)`, then runs `eval(params, batch)` per batch;
    `get_state` brings the state back as an unreplicated host-independent tree; `get` reads metrics.
    """

    kind: str
    num_devices: int
    train: Callable
    merge: Callable
    eval: Callable
    put_state: Callable[[Tree], Tree]
    put_frozen: Callable[[Tree], Tree]
    put_batch: Callable[[Mapping[str, np.ndarray]], Tree]
    get_state: Callable[[Tree], Tree]
    get: Callable[[Tree], Tree]

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.num_devices:
            raise ValueError(
                f"batch size {batch_size} is not divisible by the {self.num_devices} devices; "
                f"use a multiple of {self.num_devices} (e.g. --config.batch_size="
                f"{max(self.num_devices, batch_size // self.num_devices * self.num_devices)})")


def make_runner(model: Any, method: Method, tx: optax.GradientTransformation, *, seed: int,
                label_smoothing: float = 0.0, parallel: str = "jit",
                devices: list | None = None, schedule: Callable | None = None,
                train_form: str = "auto", mesh: tuple[int, int] | None = None,
                shard_rules: tuple[tuple[str, str], ...] = sharding.DEFAULT_RULES,
                shard_min_bytes: int = sharding.DEFAULT_MIN_BYTES,
                normalization: str | None = None) -> Runner:
    """Builds the jitted (or pmapped) train/eval steps over `devices` (default: `jax.devices()`,
    i.e. every process's devices when `jax.distributed` is initialized; `put_batch` then takes this
    process's rows and assembles the global batch, see `jax_peft.train.distributed`).

    `mesh=(data, fsdp)` with fsdp > 1 (jit only) shards the frozen parameters over an "fsdp" axis by
    `shard_rules` (see `jax_peft.train.sharding`); the batch is split over data x fsdp and the
    train state stays replicated. `data=-1` takes the devices that fsdp leaves.

    `normalization` ("minus_one_one", "imagenet", "zero_one") normalizes uint8 batch images inside the
    steps (`input_images`); None accepts float32 (host-normalized) images only."""
    if parallel not in PARALLEL:
        raise ValueError(f"unknown parallel mode {parallel!r}; use one of {PARALLEL}")
    if parallel == "pmap" and jax.process_count() > 1:
        raise ValueError(f"parallel='pmap' runs on one process only ({jax.process_count()} processes here); "
                         "use --config.parallel=jit for multi-process training")
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    data_size, fsdp = sharding.mesh_shape(n, *mesh) if mesh is not None else (n, 1)
    if fsdp > 1:
        if parallel != "jit":
            raise ValueError(f"mesh.fsdp={fsdp} needs parallel='jit' (pmap replicates every parameter)")
        return _fsdp_runner(model, method, tx, devices, data_size, fsdp, shard_rules, shard_min_bytes,
                            seed=seed, label_smoothing=label_smoothing, schedule=schedule,
                            train_form=train_form, normalization=normalization)
    if parallel == "jit":
        # Auto axes: XLA propagates the sharding (make_mesh defaults to Explicit axes in new JAX).
        mesh = jax.make_mesh((n,), (AXIS,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
        repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
        train = jax.jit(make_train_fn(model, method, tx, seed=seed, label_smoothing=label_smoothing,
                                      schedule=schedule, train_form=train_form, normalization=normalization),
                        in_shardings=(repl, repl, data), out_shardings=(repl, repl), donate_argnums=(0,))
        merge = jax.jit(make_merge_fn(model, method), in_shardings=(repl, repl), out_shardings=repl)
        evaluate = jax.jit(make_eval_fn(model, normalization=normalization), in_shardings=(repl, data),
                           out_shardings=repl)

        put_batch = functools.partial(distributed.global_batch, sharding=data)
        put = functools.partial(distributed.replicate, sharding=repl)
        return Runner("jit", n, train, merge, evaluate, put, put, put_batch, lambda s: s, jax.device_get)

    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    stacked = NamedSharding(mesh, P(AXIS))
    train = jax.pmap(make_train_fn(model, method, tx, seed=seed, label_smoothing=label_smoothing,
                                   axis_name=AXIS, schedule=schedule, train_form=train_form,
                                   normalization=normalization),
                     axis_name=AXIS, devices=devices, donate_argnums=(0,))
    merge = jax.pmap(make_merge_fn(model, method), axis_name=AXIS, devices=devices)
    evaluate = jax.pmap(make_eval_fn(model, axis_name=AXIS, normalization=normalization), axis_name=AXIS,
                        devices=devices)

    def replicate(tree):
        def one(x):
            x = np.asarray(x)
            return jax.make_array_from_callback((n,) + x.shape, stacked, lambda idx: x[None])
        return jax.tree_util.tree_map(one, tree)

    def put_batch(batch):
        def one(v):
            v = np.asarray(v)
            v = v.reshape((n, v.shape[0] // n) + v.shape[1:])
            return jax.make_array_from_callback(v.shape, stacked, lambda idx: v[idx])
        return {k: one(v) for k, v in batch.items()}

    first = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
    return Runner("pmap", n, train, merge, evaluate, replicate, replicate, put_batch, first,
                  lambda tree: jax.device_get(first(tree)))


class _ShardedStep:
    """A jitted `fn(state, frozen, *rest)` whose frozen-argument shardings are those of the frozen tree
    it is called with (set by the runner's `put_frozen`); compiled once per placement."""

    def __init__(self, fn: Callable, repl: NamedSharding, rest: tuple, out_shardings: Any, donate: bool):
        self._fn, self._repl, self._rest, self._out, self._donate = fn, repl, rest, out_shardings, donate
        self._compiled: dict = {}

    def _jitted(self, frozen: Tree) -> Callable:
        leaves, treedef = jax.tree_util.tree_flatten(frozen)
        key = (treedef, tuple(x.sharding for x in leaves))
        if key not in self._compiled:
            frozen_shardings = jax.tree_util.tree_unflatten(treedef, [x.sharding for x in leaves])
            out = {} if self._out is None else {"out_shardings": self._out}  # None: XLA chooses
            self._compiled[key] = jax.jit(self._fn, in_shardings=(self._repl, frozen_shardings, *self._rest),
                                          donate_argnums=(0,) if self._donate else (), **out)
        return self._compiled[key]

    def __call__(self, state: Tree, frozen: Tree, *rest: Tree):
        return self._jitted(frozen)(state, frozen, *rest)

    def lower(self, state: Tree, frozen: Tree, *rest: Tree):
        return self._jitted(frozen).lower(state, frozen, *rest)


def _fsdp_runner(model: Any, method: Method, tx: optax.GradientTransformation, devices: list, data_size: int,
                 fsdp: int, rules: tuple[tuple[str, str], ...], min_bytes: int, *, seed: int,
                 label_smoothing: float, schedule: Callable | None, train_form: str,
                 normalization: str | None) -> Runner:
    """jit steps over a (data, fsdp) mesh: frozen leaves sharded by `rules`, state replicated, the
    batch over both axes (each device computes its own rows, as in plain data parallelism)."""

    mesh = sharding.make_mesh(data_size, fsdp, devices)
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, sharding.BATCH)
    train = _ShardedStep(make_train_fn(model, method, tx, seed=seed, label_smoothing=label_smoothing,
                                       schedule=schedule, train_form=train_form, normalization=normalization),
                         repl, (data,), (repl, repl), donate=True)
    # The merged eval parameters keep the frozen leaves' sharding (XLA propagates it); the eval
    # forward then reads them as committed arrays.
    merge = _ShardedStep(make_merge_fn(model, method), repl, (), None, donate=False)
    evaluate = jax.jit(make_eval_fn(model, normalization=normalization), out_shardings=repl)

    def put_frozen(tree: Tree) -> Tree:
        stacked = "Transformer" in tree and scan.STACKED in tree["Transformer"]
        specs = sharding.frozen_specs(tree, fsdp, rules, min_bytes=min_bytes,
                                      stacked_prefix=f"Transformer/{scan.STACKED}/" if stacked else None)
        return sharding.put_sharded(tree, mesh, specs)

    put_batch = functools.partial(distributed.global_batch, sharding=data)
    put_state = functools.partial(distributed.replicate, sharding=repl)
    return Runner("jit", len(devices), train, merge, evaluate, put_state, put_frozen, put_batch, lambda s: s,
                  jax.device_get)
