#!/usr/bin/env python
"""Times every PEFT method's train step against its yardsticks, in one process on the same inputs.

    python scripts/benchmark.py --model ViT-B_16 --batch 8 [--dtype bf16] --json OUT
    python scripts/benchmark.py --quick --json OUT          # tiny model, smoke test (seconds)
    python scripts/benchmark.py --cost-only --json OUT      # XLA cost analysis only: compile, no timing
    python scripts/benchmark.py --model Swin-B --cost-only --json OUT   # the same on a Swin (its variants)

Measured (random weights with the model's shapes; no download):

* forward:  eval logits (B, C).
* floor:    forward + gradient w.r.t. the input images: the backward pass through every activation
            that any frozen-backbone method needs, with no weight gradient.
* full:     forward + gradients of every parameter (full fine-tuning without the optimizer).
* methods:  each method's complete jitted train step (forward, gradients of the trainable tree
            {adapter, head}, AdamW update, donated state); activation form for FacT-TT/TK, EFFT and
            LoRA (their official training dropout on) and SSF (scale-shifts on the frozen linears'
            outputs), weight form for RLRR, BitFit and full fine-tuning; the linear probe trains
            the head only.

Every function is compiled ahead of time (`jit(...).lower(...).compile()`: compile time), its FLOPs
come from `compiled.cost_analysis()` and its peak memory from `compiled.memory_analysis()`. After two
untimed warm-up rounds, the functions are timed in interleaved rounds (so a change in machine load hits all of
them alike; `--repeat N` makes N calls in a row and times the last). The median per function is
reported, with ratios to the floor, full fine-tuning and the forward pass, and the targets of issue 6
(pass/fail). Page faults per call are recorded. Like the training CLI, the benchmark first calls
`jax_peft.host.keep_freed_memory()`, so glibc keeps XLA's freed temporaries for the next call instead
of handing them back to the kernel and faulting them in again (~0.4-0.7 million faults, ~1-3 s of
kernel CPU time per ViT-B/16 step here); `--system-malloc` measures with glibc's defaults instead.

Cost figures (deterministic for a given jax/XLA version, unlike the timings on a shared machine):
XLA's cost analysis of every compiled function, FLOPs and bytes accessed (`cost_analysis()["flops"]`,
`["bytes accessed"]`), with each method's ratios to the floor, full fine-tuning (full_grads and the
full AdamW train step) and the forward pass, checked against COST_TARGETS. For the activation-form
methods also their side paths' products in a train step (3 × the forward products, counted in the
jaxpr), over the floor: how far the factored math lets a FLOPs ratio fall. `--cost-only` compiles and
reports these without running anything timed (a few minutes for ViT-B/16 on 2 cores).

If `torch` and `timm` are importable, the official PyTorch formulation of the methods it covers is
timed too on the same CPU (`--no-torch` skips it); otherwise that part is reported as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--quick" in sys.argv:  # the smoke test is all compile time: skip LLVM's optimization passes
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()

from jax_peft import host  # noqa: E402

# glibc keeps XLA's freed temporaries for reuse instead of page-faulting them in afresh on every call,
# as in the training CLI (jax_peft/host.py); before JAX starts. --system-malloc: glibc's defaults.
MALLOC_TUNED = "--system-malloc" not in sys.argv and host.keep_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jax_peft  # noqa: E402
from jax_peft.methods.activation import forward as method_forward  # noqa: E402
from jax_peft.methods.activation import supports_activation_form  # noqa: E402
from jax_peft.methods.base import get_method, init_head  # noqa: E402
from jax_peft.scan import unstack_blocks  # noqa: E402

# Benchmarked methods and their hyper-parameters (the papers' ViT-B/16 settings).
METHODS: dict[str, dict[str, Any]] = {
    "rlrr": {},
    "fact_tt": dict(rank=8, scale=10.0, dropout=0.1),
    "fact_tk": dict(rank=32, scale=1.0, dropout=0.1),
    "efft": dict(rank=16, scale=1.0, dropout=0.1),
    "ssf": {},
    "lora": dict(rank=8, variant="fused_qkv", dropout=0.1),
    "bitfit": {},
    "linear": {},
    "full": {},
}
# On a Swin (--model Swin-B): each paper's Swin setting where it differs (FacT Table 2's FacT-TT16;
# EFFT's released stage ranks); the rest as on the ViT. The method names dispatch to the Swin variants.
SWIN_OVERRIDES: dict[str, dict[str, Any]] = {"fact_tt": dict(rank=16, scale=10.0, dropout=0.1), "efft": {}}
LOW_RANK = ("fact_tt", "fact_tk", "efft", "lora")
RESCALE = ("rlrr", "ssf", "bitfit")
# (methods, yardstick, max ratio) from issue 6
TARGETS = [(LOW_RANK, "floor", 1.10), (RESCALE, "full", 1.05), (("linear",), "forward", 1.05)]
TORCH_SPEEDUP = 2.0
# (methods, yardstick, cost figure, max ratio) from issue 17: XLA's cost analysis, deterministic
# "full fine-tuning's bytes" = the full fine-tuning train step's (its AdamW update included), the step
# each rescaling method replaces; the ratio to full_grads (no optimizer) is reported beside it.
COST_TARGETS = [(LOW_RANK, "floor", "flops", 1.05), (LOW_RANK, "floor", "bytes", 1.15),
                (RESCALE, "full_step", "bytes", 1.0)]


@dataclasses.dataclass
class Timed:
    """A compiled function with its arguments and measurements."""

    name: str
    compiled: Any
    args: tuple
    compile_s: float
    gflops: float
    peak_bytes: int
    carry: bool = False  # the first output replaces the first argument (donated train state)
    xla_peak_bytes: int = 0
    bytes_accessed: float = 0.0  # XLA cost analysis "bytes accessed"
    times: list = dataclasses.field(default_factory=list)
    cpu_times: list = dataclasses.field(default_factory=list)  # process CPU time (all threads)
    faults: list = dataclasses.field(default_factory=list)  # minor page faults per call

    def call(self, repeat: int = 1) -> None:
        """`repeat` calls in a row (as a training loop makes them); the last one is measured."""
        for _ in range(repeat - 1):
            self._run()
        f0, t0, c0 = host.page_faults(), time.perf_counter(), time.process_time()
        self._run()
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.process_time() - c0)
        self.faults.append(host.page_faults() - f0)

    def _run(self) -> None:
        out = self.compiled(*self.args)
        jax.block_until_ready(out)
        if self.carry:
            self.args = (out[0],) + self.args[1:]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)

    @property
    def faults_median(self) -> int:
        return int(statistics.median(self.faults))


def compile_fn(name: str, fn: Callable, args: tuple, donate: tuple = (), carry: bool = False) -> Timed:
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))
    bytes_accessed = float((cost or {}).get("bytes accessed", 0.0))
    mem = compiled.memory_analysis()
    # Footprint while the program runs: arguments + outputs + XLA's temp arena, less donated (aliased)
    # buffers. (`peak_memory_in_bytes`, XLA's live-buffer simulation, is smaller and kept for reference.)
    peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)
    t = Timed(name, compiled, args, compile_s, flops / 1e9, peak, carry)
    t.xla_peak_bytes = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    t.bytes_accessed = bytes_accessed
    return t


def matmul_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of the dot_general products in fn's jaxpr (2 per multiply-add; nested jaxprs included,
    a scan's body times its length). Unlike XLA's count, no element-wise op is in it."""

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
            times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                total += times * count(getattr(sub, "jaxpr", sub))
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def make_step(model: Any, method: Any, tx: optax.GradientTransformation, form: str) -> Callable:
    """`step(state, frozen, images, labels, key) -> (state, loss)`: one AdamW step of {adapter, head}."""

    def step(state, frozen, images, labels, key):
        key = jax.random.fold_in(key, state["step"])

        def loss_fn(trainable):
            params = {**frozen, "head": trainable["head"]}
            logits = method_forward(model, method, params, trainable["adapter"], images, train=True,
                                    rng=key, form=form)
            return cross_entropy(logits, labels)

        loss, grads = jax.value_and_grad(loss_fn)(state["trainable"])
        updates, opt = tx.update(grads, state["opt"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        return {"step": state["step"] + 1, "trainable": trainable, "opt": opt}, loss

    return step


def is_swin(args: argparse.Namespace) -> bool:
    return args.model.lower().startswith("swin")


def model_config(args: argparse.Namespace):
    dtype = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}[args.dtype]
    if is_swin(args):
        if args.quick or args.layers or args.scan:
            raise SystemExit("--quick, --layers and --scan are ViT options; a Swin is benchmarked at its named size")
        return jax_peft.swin_config(args.model, num_classes=args.num_classes, image_size=args.image_size,
                                    dtype=dtype)
    if args.quick:
        return jax_peft.vit_config(None, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                   mlp_dim=128, num_classes=10, image_size=16, dtype=dtype, name="quick",
                                   scan=args.scan)
    extra = {"num_layers": args.layers} if args.layers else {}
    return jax_peft.vit_config(args.model, num_classes=args.num_classes, image_size=args.image_size,
                               dtype=dtype, scan=args.scan, **extra)


def quick_hparams(name: str, hp: dict) -> dict:
    """Ranks that fit the tiny --quick model."""
    return {**hp, "rank": min(hp["rank"], 4)} if "rank" in hp else hp


def build(args: argparse.Namespace, methods: list[str]) -> tuple[list[Timed], dict]:
    cfg = model_config(args)
    swin = is_swin(args)
    model = jax_peft.Swin(cfg) if swin else jax_peft.ViT(cfg)
    key = jax.random.PRNGKey(args.seed)
    k_init, k_head, k_x, k_y, k_m = jax.random.split(key, 5)
    if swin:
        params = dict(jax_peft.swin.init_params(cfg, k_init))
        width = cfg.stage_dim(len(cfg.depths) - 1)
    else:
        params = jax_peft.init_params(cfg, k_init)  # stacked blocks with --scan (jax_peft.scan layout)
        width = cfg.hidden_size
    params["head"] = init_head(k_head, width, cfg.num_classes, "torch_linear")
    scanned = getattr(cfg, "scan", False)
    canonical = unstack_blocks(params) if scanned else params  # what methods are built on
    images = jax.random.uniform(k_x, (args.batch, cfg.image_size, cfg.image_size, 3), jnp.float32, -1, 1)
    labels = jax.random.randint(k_y, (args.batch,), 0, cfg.num_classes)
    info = {"model": cfg.name, "config": dataclasses.asdict(cfg), "batch": args.batch}

    def fwd(p, x):
        return model.apply({"params": p}, x)

    def floor(p, x, y):  # forward + input gradient, no weight gradient
        return jax.grad(lambda x: cross_entropy(model.apply({"params": p}, x), y))(x)

    def full(p, x, y):  # forward + every weight gradient
        return jax.value_and_grad(lambda p: cross_entropy(model.apply({"params": p}, x), y))(p)

    fns = [compile_fn("forward", fwd, (params, images)),
           compile_fn("floor", floor, (params, images, labels)),
           compile_fn("full_grads", full, (params, images, labels))]
    print("compiled baselines: " + ", ".join(f"{t.name} {t.compile_s:.1f}s" for t in fns), flush=True)

    frozen = {k: v for k, v in params.items() if k != "head"}
    forms = {}
    for i, name in enumerate(methods):
        hp = SWIN_OVERRIDES.get(name, METHODS[name]) if swin else METHODS[name]
        method = get_method(name, **(quick_hparams(name, hp) if args.quick else hp))
        key = jax.random.fold_in(k_m, i)
        abstract = {"adapter": jax.eval_shape(method.init, key, canonical), "head": params["head"]}
        tx = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
                         mask=method.decay_mask(abstract))

        def init_state(key, params, method=method, tx=tx):  # one compile instead of op-by-op dispatch
            trainable = {"adapter": method.init(key, params), "head": params["head"]}
            return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt": tx.init(trainable)}

        state = jax.jit(init_state)(key, canonical)
        state = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), state)  # own buffers to donate
        adapter = state["trainable"]["adapter"]
        form = "activation" if supports_activation_form(method) else "weight"
        forms[name] = {"form": form, "hparams": method.hparams(), "trainable_params": method.num_params(adapter)}
        t = compile_fn(name, make_step(model, method, tx, form), (state, frozen, images, labels, k_m),
                       donate=(0,), carry=True)
        fns.append(t)
        if form == "activation":  # the side paths' own products, from the eval forward with them
            def side_forward(p, adapter, x, method=method):
                return method_forward(model, method, p, adapter, x, form="activation")
            forms[name]["side_forward_gflops"] = (matmul_flops(side_forward, params, adapter, images)
                                                  - matmul_flops(fwd, params, images)) / 1e9
        print(f"compiled {name} ({form} form): {t.compile_s:.1f}s, {t.gflops:.1f} GFLOP", flush=True)
    info["methods"] = forms
    return fns, info


def run_rounds(fns: list[Timed], warmup: int, runs: int, repeat: int = 1) -> None:
    """`runs` interleaved rounds (so a change in machine load hits every function alike; the order
    rotates by one function per round); in each,
    every function runs `repeat` times in a row and the last call is timed (repeat > 1: the steady
    state of a training loop, where the previous step's freed buffers can be reused)."""
    for _ in range(warmup):
        for t in fns:
            t.call()
        for t in fns:
            t.times.clear()
            t.cpu_times.clear()
            t.faults.clear()
    for r in range(runs):
        # each round starts one function later, so none always runs right after the same neighbour
        for t in fns[r % len(fns):] + fns[:r % len(fns)]:
            t.call(repeat)
        print(f"round {r + 1}/{runs}: " + " ".join(f"{t.name}={t.times[-1]:.3f}" for t in fns), flush=True)


# --- optional: the official PyTorch formulations ------------------------------------------------
def torch_benchmark(args: argparse.Namespace, methods: list[str]) -> dict:
    """Times the official PyTorch formulations (timm ViT) when torch and timm are installed."""
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        return {"skipped": f"torch/timm not importable ({e.name}); install both to time the official code"}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import benchmark_torch  # the PyTorch formulations live in their own module

    return benchmark_torch.run(args, methods)


# --- cost figures (deterministic) ---------------------------------------------------------------
def cost_figures(fns: list[Timed], methods: dict | None = None) -> dict:
    """XLA cost analysis per function (GFLOP, GB accessed) and its ratios to the yardsticks: forward,
    floor, full (forward + every weight gradient) and full_step (the full fine-tuning train step with
    AdamW, when benchmarked); COST_TARGETS checked.

    For an activation-form method (`methods[name]["side_forward_gflops"]`: the FLOPs of its side
    paths' products in the forward pass, from the jaxprs) also those products' share of a train step,
    3 × that: each product needs two of the same size in the backward pass, the gradient of its input
    and that of its factor (block 0's first input gradient is the only one a step can skip). Over the
    floor's FLOPs this is what the factored math adds to the backbone's backward pass, which a step
    needs almost whole (it skips only the image gradient and block 0's q|k|v input gradient: 1.3 %
    of the floor on ViT-B/16, 0.5 % on Swin-B); a FLOPs target under 1 + this − those is out of
    reach at these ranks.
    """
    by = {t.name: t for t in fns}
    methods = methods or {}
    yard = {"forward": by["forward"], "floor": by["floor"], "full": by["full_grads"]}
    if "full" in by:
        yard["full_step"] = by["full"]

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    rows = {}
    for t in fns:
        row = {"gflops": t.gflops, "gbytes_accessed": t.bytes_accessed / 1e9}
        for y, base in yard.items():
            row[f"flops_over_{y}"] = ratio(t.gflops, base.gflops)
            row[f"bytes_over_{y}"] = ratio(t.bytes_accessed, base.bytes_accessed)
        side = methods.get(t.name, {}).get("side_forward_gflops")
        if side is not None:
            train = 3 * side
            row["side_forward_gflops"] = side
            row["side_train_gflops"] = train
            row["flops_side_over_floor"] = ratio(train, yard["floor"].gflops)
        rows[t.name] = row
    targets = []
    for names, base, figure, limit in COST_TARGETS:
        for n in names:
            if n in rows and n in by and rows[n].get(f"{figure}_over_{base}") is not None:  # full_step: with "full" only
                r = rows[n][f"{figure}_over_{base}"]
                target = {"method": n, "figure": figure, "vs": base, "ratio": r, "max": limit, "pass": r <= limit}
                side = rows[n].get("flops_side_over_floor")
                if figure == "flops" and base == "floor" and side is not None:
                    target["side_paths_over_floor"] = side
                targets.append(target)
    return {"functions": rows, "targets": targets, "all_targets_pass": all(t["pass"] for t in targets),
            "yardsticks": {"forward": "forward", "floor": "floor", "full": "full_grads",
                           "full_step": "full (train step, AdamW)"}}


def print_costs(cost: dict) -> None:
    goal = {}
    for names, base, figure, limit in COST_TARGETS:
        for n in names:
            goal.setdefault(n, []).append((figure, base, limit))
    print("\nXLA cost analysis of the compiled functions (deterministic)")
    head = (f"{'function':<10} {'GFLOP':>8} {'GB acc':>7} {'F/floor':>7} {'B/floor':>7} {'F/full':>6} "
            f"{'B/full':>6} {'B/fstep':>7} {'F/fwd':>6} {'B/fwd':>6} {'Fside/fl':>8}  targets")
    print(head)
    print("-" * len(head))
    for name, r in cost["functions"].items():
        def f(key: str, width: int) -> str:
            v = r.get(key)
            return f"{v:{width}.3f}" if v is not None else " " * (width - 1) + "-"
        tg = "; ".join(f"{fig} <= {lim:.2f}x {base}: {'PASS' if r[f'{fig}_over_{base}'] <= lim else 'FAIL'}"
                       for fig, base, lim in goal.get(name, []))
        print(f"{name:<10} {r['gflops']:8.1f} {r['gbytes_accessed']:7.2f} {f('flops_over_floor', 7)} "
              f"{f('bytes_over_floor', 7)} {f('flops_over_full', 6)} {f('bytes_over_full', 6)} "
              f"{f('bytes_over_full_step', 7)} {f('flops_over_forward', 6)} {f('bytes_over_forward', 6)} "
              f"{f('flops_side_over_floor', 8)}  {tg}")
    print("Fside/fl: the side paths' products in a train step (3 x their forward products: each and its two "
          "gradients) over the floor's FLOPs")


# --- report -----------------------------------------------------------------------------------
def report(fns: list[Timed], info: dict, args: argparse.Namespace, torch_res: dict) -> dict:
    by = {t.name: t for t in fns}
    fwd, floor, full = by["forward"].median, by["floor"].median, by["full_grads"].median
    yard = {"forward": fwd, "floor": floor, "full": full}
    cyard = {"forward": by["forward"].cpu_median, "floor": by["floor"].cpu_median, "full": by["full_grads"].cpu_median}
    res: dict[str, Any] = {
        **info,
        "dtype": args.dtype, "runs": args.runs, "warmup": args.warmup, "repeat": args.repeat,
        "jax": jax.__version__, "backend": jax.default_backend(), "devices": len(jax.devices()),
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "malloc": "reuse freed memory (jax_peft.host.keep_freed_memory)" if MALLOC_TUNED else "system default",
        "loadavg_1m_start_end": info.pop("loadavg", None),
        "forward_s": fwd, "floor_s": floor, "full_s": full,
        "floor_over_forward": floor / fwd, "full_over_forward": full / fwd,
        "cpu_forward_s": cyard["forward"], "cpu_floor_s": cyard["floor"], "cpu_full_s": cyard["full"],
        "baselines": {t.name: {"step_s": t.median, "times_s": t.times, "cpu_s": t.cpu_median,
                               "cpu_times_s": t.cpu_times, "page_faults": t.faults_median, "gflops": t.gflops,
                               "peak_bytes": t.peak_bytes, "compile_s": t.compile_s}
                      for t in fns[:3]},
        "methods": {},
    }
    for t in fns[3:]:
        res["methods"][t.name] = {
            **info["methods"][t.name],
            "step_s": t.median, "times_s": t.times, "gflops": t.gflops, "peak_bytes": t.peak_bytes,
            "xla_peak_bytes": t.xla_peak_bytes, "compile_s": t.compile_s,
            "over_floor": t.median / floor, "over_full": t.median / full, "over_forward": t.median / fwd,
            "cpu_s": t.cpu_median, "cpu_times_s": t.cpu_times, "page_faults": t.faults_median,
            "cpu_over_floor": t.cpu_median / cyard["floor"], "cpu_over_full": t.cpu_median / cyard["full"],
            "cpu_over_forward": t.cpu_median / cyard["forward"],
        }
    if "full" in res["methods"]:  # context: against the complete full fine-tuning train step (AdamW too)
        full_step = res["methods"]["full"]
        for row in res["methods"].values():
            row["over_full_step"] = row["step_s"] / full_step["step_s"]
            row["cpu_over_full_step"] = row["cpu_s"] / full_step["cpu_s"]
    targets = []
    for names, base, limit in TARGETS:
        for n in names:
            if n in res["methods"]:
                ratio = res["methods"][n]["step_s"] / yard[base]
                cpu_ratio = res["methods"][n]["cpu_s"] / cyard[base]
                targets.append({"method": n, "vs": base, "ratio": ratio, "max": limit, "pass": ratio <= limit,
                                "cpu_ratio": cpu_ratio, "cpu_pass": cpu_ratio <= limit})
    res["torch"] = torch_res
    for n, row in (torch_res.get("methods") or {}).items():
        if n in res["methods"]:
            speedup = row["step_s"] / res["methods"][n]["step_s"]
            res["methods"][n]["torch_step_s"] = row["step_s"]
            res["methods"][n]["speedup_vs_torch"] = speedup
            targets.append({"method": n, "vs": "torch", "ratio": speedup, "min": TORCH_SPEEDUP,
                            "pass": speedup >= TORCH_SPEEDUP})
    res["targets"] = targets
    res["all_targets_pass"] = all(t["pass"] for t in targets)

    print()
    print(f"{res['model']} batch {args.batch} {args.dtype} on {res['backend']} ({res['cpu_count']} CPUs), "
          f"median of {args.runs} interleaved rounds (call {args.repeat} of {args.repeat} in a row timed) after "
          f"{args.warmup} warm-up; malloc: {res['malloc']}")
    print(f"forward {fwd:.3f}s | floor (fwd + input grad) {floor:.3f}s = {floor / fwd:.2f}x fwd | "
          f"full grads {full:.3f}s = {full / fwd:.2f}x fwd")
    head = f"{'method':<10} {'form':<10} {'step s':>7} {'/floor':>6} {'/full':>6} {'/fwd':>6} " \
           f"{'cpu s':>7} {'c/floor':>7} {'c/full':>6} {'c/fwd':>6} " \
           f"{'GFLOP':>7} {'peak MB':>7} {'faults':>7} {'compile':>7}  target (wall ratio; cpu ratio)"
    print(head)
    print("-" * len(head))
    goal = {n: (base, limit) for names, base, limit in TARGETS for n in names}
    for t in fns:
        row = res["methods"].get(t.name)
        form = row["form"] if row else "-"
        tgt = ""
        if t.name in goal:
            base, limit = goal[t.name]
            r, c = t.median / yard[base], t.cpu_median / cyard[base]
            tgt = (f"<= {limit:.2f}x {base}: {'PASS' if r <= limit else 'FAIL'} ({r:.3f}; "
                   f"cpu {'PASS' if c <= limit else 'FAIL'} {c:.3f})")
        cy = t.cpu_median
        print(f"{t.name:<10} {form:<10} {t.median:7.3f} {t.median / floor:6.3f} {t.median / full:6.3f} "
              f"{t.median / fwd:6.3f} {cy:7.3f} {cy / cyard['floor']:7.3f} {cy / cyard['full']:6.3f} "
              f"{cy / cyard['forward']:6.3f} {t.gflops:7.1f} {t.peak_bytes / 2**20:7.0f} {t.faults_median:7d} {t.compile_s:7.1f}  {tgt}")
    if "skipped" in torch_res:
        print(f"PyTorch comparison skipped: {torch_res['skipped']}")
    else:
        for n, row in torch_res.get("methods", {}).items():
            if n in res["methods"]:
                print(f"torch {n}: {row['step_s']:.3f}s, jax_peft {res['methods'][n]['speedup_vs_torch']:.2f}x faster")
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B_16", help="model name (ViT-B_16, ViT-S/16, ...)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "float32", "bfloat16"],
                   help="compute dtype (parameters, gradients and optimizer state stay float32)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--layers", type=int, default=0, help="override the depth (0: the model's own)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of methods")
    p.add_argument("--runs", type=int, default=None, help="timed rounds (default 7; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed rounds first (2: a fresh executable's second call can still grow the "
                        "reused heap, ~0.5 million page faults once)")
    p.add_argument("--repeat", type=int, default=1,
                   help="calls of each function in a row per round, the last one timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
    p.add_argument("--scan", action="store_true",
                   help="one lax.scan over the blocks (ViTConfig.scan; stacked frozen parameters): compile time")
    p.add_argument("--no-torch", action="store_true", help="do not time the PyTorch formulations")
    p.add_argument("--cost-only", action="store_true",
                   help="compile every function and report XLA's cost analysis (FLOPs, bytes accessed, "
                        "ratios, COST_TARGETS); no timing, no PyTorch")
    p.add_argument("--system-malloc", action="store_true",
                   help="do not call jax_peft.host.keep_freed_memory() (glibc's defaults: XLA's temporaries "
                        "are unmapped after each call and page-faulted in again by the next)")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.quick else 7
    if args.quick:
        args.batch = min(args.batch, 4)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    args.method_list = methods
    if args.runs < 1 or args.warmup < 0 or args.batch < 1 or args.repeat < 1:
        p.error("--runs, --repeat and --batch must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load0 = os.getloadavg()[0]
    fns, info = build(args, args.method_list)
    if args.cost_only:
        res = {**info, "dtype": args.dtype, "mode": "cost-only", "jax": jax.__version__,
               "backend": jax.default_backend(), "platform": platform.platform(),
               "compile_s": {t.name: t.compile_s for t in fns},
               "peak_bytes": {t.name: t.peak_bytes for t in fns}}
    else:
        run_rounds(fns, args.warmup, args.runs, args.repeat)
        info["loadavg"] = [load0, os.getloadavg()[0]]
        if args.no_torch:
            torch_res = {"skipped": "--no-torch"}
        elif is_swin(args):
            torch_res = {"skipped": "the PyTorch formulations are timed on the ViT only"}
        elif args.quick:  # the tiny model is not compared; still say so when torch is not there at all
            absent = importlib.util.find_spec("torch") is None or importlib.util.find_spec("timm") is None
            torch_res = {"skipped": "torch/timm not installed" if absent else "--quick (compared at full size only)"}
        else:
            torch_res = torch_benchmark(args, args.method_list)
        res = report(fns, info, args, torch_res)
    res["cost"] = cost_figures(fns, info["methods"])
    print_costs(res["cost"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
