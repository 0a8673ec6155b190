"""End-to-end demo on a CPU, no download: `python -m jax_peft.demo --workdir DIR`.

1. Pretrains a small ViT (patch 8, width 96, 3 blocks, 32x32 images) on `synthetic/upstream`
   (colour x texture of one object) with the real training loop, exports it as a Google-layout
   `.npz` (`save_checkpoint`) and caches it as `DIR/upstream_vit_seed<N>_<config hash>.npz` (reused
   by later runs with the same seed and pretraining config).
2. Adapts the reloaded checkpoint (`load_checkpoint`, via the config's `model.checkpoint`) to
   `synthetic/downstream` (colour of the LEFT of two objects) with each method, through
   `jax_peft.train.loop.train_and_evaluate`, and measures held-out test accuracy.
3. Prints a table and writes `DIR/demo_summary.json`; accuracies are fractions in [0, 1].
4. Merges the best PEFT adapter (`jax_peft.merge`), exports it as `.npz` and checks that the merged
   model's logits equal the adapted model's.

Runs are configured by `jax_peft.configs.demo` (one config per run; `--quick` = a tiny version for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_METHODS = ("linear", "rlrr", "fact_tt", "lora", "full")
NOT_PEFT = ("linear", "full")  # the baselines the best PEFT method is compared with / reported beside

EXPLANATION = """\
What this demo shows: the whole jax_peft pipeline on a CPU in a few minutes, with no download. A small
ViT (patch 8, width 96, 3 blocks, 32x32 images) is pretrained on generated images (classify the
colour and texture of one object), saved as a Google-layout .npz and reloaded with load_checkpoint.
It is then adapted to a different generated task (name the colour of the LEFT of two objects) with a
linear probe, RLRR, FacT-TT, LoRA and full fine-tuning through the real training loop (optax-masked
jit steps, orbax checkpoints), scored on a held-out test split, and the best PEFT adapter is merged
into plain ViT weights and exported as .npz with the same logits. The backbone already has the
needed features (colours) but pools both objects into one representation, so a probe on frozen
features stays near its ceiling of about 0.56, while methods that adapt the backbone learn to attend
to the left object and beat it clearly (the best PEFT method by more than 5 points); full
fine-tuning nearly solves this easy, tiny-model task. What it does not show: the papers' numbers or
rankings. Model, data and budget are tiny (a few hundred steps, PEFT methods not converged, lightly
tuned learning rates), so the order of the methods here says nothing about VTAB-1k or FGVC with
ViT-B/16 (use jax_peft.configs.vtab1k and jax_peft.configs.fgvc), and timings are for this toy size."""


def _config(which: str, quick: bool, seed: int, checkpoint: str | None = None, progress: bool = True) -> Any:
    from jax_peft.configs import demo as demo_config

    cfg = demo_config.get_config(f"{which},quick" if quick else which)
    cfg.seed = seed
    cfg.progress = progress  # the training CLI's progress line (stderr): step, loss, images/s, ETA
    if checkpoint is not None:
        cfg.model.checkpoint = checkpoint
    return cfg


def _say(msg: str) -> None:
    print(msg, flush=True)


def backbone_path(workdir: str, cfg: Any) -> str:
    """`workdir/upstream_vit_seed<N>_<hash>.npz`: the cache file of the backbone that pretraining
    config `cfg` produces (the hash covers every field but `progress`, the seed included)."""
    import hashlib

    from jax_peft.train import checkpointing

    fields = checkpointing.config_to_json(cfg)
    fields.pop("progress", None)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(workdir, f"upstream_vit_seed{int(cfg.seed)}_{digest}.npz")


def pretrain(workdir: str, *, quick: bool = False, seed: int = 0, force: bool = False,
             progress: bool = True) -> tuple[str, dict]:
    """The cached upstream backbone for this seed and config (trained if missing; `backbone_path`)
    and its info (upstream test accuracy, steps, time)."""
    from jax_peft import checkpoint as ck
    from jax_peft.train import loop

    cfg = _config("pretrain", quick, seed, progress=progress)
    path = backbone_path(workdir, cfg)
    info_path = path[:-4] + ".json"
    if os.path.exists(path) and os.path.exists(info_path) and not force:
        with open(info_path) as f:
            info = json.load(f)
        _say(f"[1/3] pretrained backbone: cached {path} (upstream test accuracy {info['test_accuracy']:.3f})")
        return path, info
    run_dir = os.path.join(workdir, "pretrain_quick" if quick else "pretrain")
    shutil.rmtree(run_dir, ignore_errors=True)
    _say(f"[1/3] pretraining a ViT (patch {cfg.model.patch_size}, width {cfg.model.hidden_size}, "
         f"{cfg.model.num_layers} blocks) on synthetic/upstream for {cfg.total_steps} steps ...")
    t0 = time.perf_counter()
    summary = loop.train_and_evaluate(cfg, run_dir)
    test = loop.evaluate(cfg, run_dir, split="test")
    # The loop exported the trained model (export_merged); round-trip it through the public
    # checkpoint API into the cache file.
    params = ck.load_checkpoint(summary["merged_checkpoint"])
    ck.save_checkpoint(path, params)
    info = dict(test_accuracy=float(test["eval_accuracy"]), steps=int(summary["steps"]),
                time_s=time.perf_counter() - t0, task="synthetic/upstream",
                params=int(sum(np.size(x) for x in _leaves(params))))
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    _say(f"      upstream test accuracy {info['test_accuracy']:.3f} ({info['time_s']:.0f} s); saved {path}")
    return path, info


def _leaves(tree: Any) -> list:
    import jax

    return jax.tree_util.tree_leaves(tree)


def adapt(method: str, backbone: str, workdir: str, *, quick: bool = False, seed: int = 0,
          progress: bool = True) -> dict:
    """Trains `method` on synthetic/downstream from `backbone` in `workdir/adapt/<method>` (fresh)."""
    from jax_peft.train import loop

    run_dir = os.path.join(workdir, "adapt", method)
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = _config(method, quick, seed, checkpoint=backbone, progress=progress)
    t0 = time.perf_counter()
    summary = loop.train_and_evaluate(cfg, run_dir)
    test = loop.evaluate(cfg, run_dir, split="test")
    return {
        "method": method,
        "trainable_params": int(summary["trainable_params"]),
        "trainable_params_with_head": int(summary["trainable_params_with_head"]),
        "val_accuracy": float(summary["final_eval_accuracy"]),
        "test_accuracy": float(test["eval_accuracy"]),
        "time_s": round(time.perf_counter() - t0, 2),
        "steps": int(summary["steps"]),
        "lr": float(cfg.optimizer.lr),
        "workdir": run_dir,
    }


def merge_and_check(method: str, backbone: str, run_dir: str, out_path: str, *, quick: bool = False,
                    seed: int = 0, num_images: int = 64) -> dict:
    """Exports the merged model of a finished run (Google .npz) and compares the reloaded file's logits
    with the adapted model's on `num_images` test images (max |difference|, argmax agreement)."""
    import jax

    from jax_peft import checkpoint as ck
    from jax_peft import data
    from jax_peft.merge import merge
    from jax_peft.methods import activation
    from jax_peft.train import checkpointing, loop
    from jax_peft.train import step as step_lib

    cfg = _config(method, quick, seed, checkpoint=backbone)
    s = loop.setup(cfg)
    mgr = checkpointing.Checkpointer(os.path.join(run_dir, "checkpoints"), keep=int(cfg.keep_checkpoints),
                                     keep_best=bool(cfg.keep_best))
    restored = mgr.restore(s.abstract_state())
    mgr.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints; the {method} run did not finish")
    trainable = jax.device_get(restored[0]["trainable"])
    frozen = jax.tree_util.tree_map(np.asarray, s.frozen)  # the run's frozen leaves are read from disk lazily
    params = step_lib.join_params(frozen, trainable)
    merged = merge(params, s.method, trainable["adapter"], spec=restored[1].get(checkpointing.SPEC_KEY))
    ck.save_checkpoint(out_path, jax.device_get(merged))
    reloaded = ck.load_checkpoint(out_path)

    batch = next(data.make_dataset("synthetic/downstream", "test", batch_size=num_images,
                                   image_size=int(cfg.data.image_size), train=False,
                                   process_index=0, process_count=1, prefetch=0))
    x = batch["image"]
    # Adapted logits in the form training used (activation form, side paths beside the frozen kernels,
    # for FacT/EFFT/LoRA; weight form otherwise) vs the merged plain model reloaded from the .npz.
    adapted = activation.forward(s.model, s.method, params, trainable["adapter"], x, train=False, form="auto")
    plain = s.model.apply({"params": reloaded}, x, train=False)
    diff = float(np.max(np.abs(np.asarray(adapted) - np.asarray(plain))))
    agree = float(np.mean(np.argmax(adapted, -1) == np.argmax(plain, -1)))
    return {"method": method, "path": out_path, "max_abs_logit_diff": diff, "argmax_agreement": agree,
            "num_images": num_images}


def format_table(results: Sequence[dict]) -> str:
    """Plain-text table: method, trainable parameters (without / with the head), test accuracy, time."""
    rows = [("method", "trainable params", "+ head", "test accuracy", "time (s)")]
    rows += [(r["method"], f"{r['trainable_params']:,}",
              f"{r.get('trainable_params_with_head', r['trainable_params']):,}",
              f"{r['test_accuracy']:.3f}", f"{r['time_s']:.1f}") for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]])


def run(workdir: str, *, methods: Sequence[str] = DEFAULT_METHODS, quick: bool = False, seed: int = 0,
        force_pretrain: bool = False, progress: bool = True) -> dict:
    """The whole demo; returns (and writes to `workdir/demo_summary.json`) the summary."""
    if "linear" not in methods:
        raise ValueError("the demo compares against the linear probe; keep 'linear' in --methods")
    t_start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    backbone, pre = pretrain(workdir, quick=quick, seed=seed, force=force_pretrain, progress=progress)

    results = []
    for i, m in enumerate(methods):
        _say(f"[2/3] adapting to synthetic/downstream: {m} ({i + 1}/{len(methods)}) ...")
        r = adapt(m, backbone, workdir, quick=quick, seed=seed, progress=progress)
        _say(f"      {m}: test accuracy {r['test_accuracy']:.3f}, {r['trainable_params']:,} trainable "
             f"parameters (+ head: {r['trainable_params_with_head']:,}), {r['time_s']:.1f} s")
        results.append(r)

    probe = next(r for r in results if r["method"] == "linear")
    peft = [r for r in results if r["method"] not in NOT_PEFT]
    best = max(peft, key=lambda r: r["test_accuracy"]) if peft else None
    check = None
    if best is not None:
        _say(f"[3/3] merging the best PEFT adapter ({best['method']}) and exporting it ...")
        check = merge_and_check(best["method"], backbone, best["workdir"],
                                os.path.join(workdir, f"merged_{best['method']}.npz"), quick=quick, seed=seed)

    summary = {
        "results": [{k: r[k] for k in ("method", "trainable_params", "trainable_params_with_head",
                                        "test_accuracy", "val_accuracy", "time_s", "steps", "lr")}
                    for r in results],
        "accuracy_unit": "fraction in [0, 1] on the held-out test split (2000 images)",
        "trainable_params_note": "method parameters without the classification head",
        "pretrain": {"backbone": backbone, **pre},
        "best_peft": best["method"] if best else None,
        "best_peft_minus_linear": (best["test_accuracy"] - probe["test_accuracy"]) if best else None,
        "merge_check": check,
        "quick": quick,
        "seed": seed,
        "total_time_s": round(time.perf_counter() - t_start, 1),
    }
    with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    _say("")
    _say(format_table(results))
    _say("")
    if best is not None:
        _say(f"best PEFT method: {best['method']} ({best['test_accuracy']:.3f}) vs linear probe "
             f"({probe['test_accuracy']:.3f}): {100 * summary['best_peft_minus_linear']:+.1f} points")
        _say(f"merged {best['method']} exported to {check['path']}: max |logit difference| merged vs adapted = "
             f"{check['max_abs_logit_diff']:.2e} on {check['num_images']} test images")
    _say(f"summary: {os.path.join(workdir, 'demo_summary.json')} (accuracies are fractions in [0, 1]); "
         f"total {summary['total_time_s']:.0f} s")
    _say("")
    _say(EXPLANATION)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jax_peft.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="output directory (also caches the pretrained backbone)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated methods to adapt with (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--seed", type=int, default=0, help="seed of pretraining and adaptation (the generated data are fixed); each seed "
                   "pretrains and caches its own backbone")
    p.add_argument("--quick", action="store_true", help="tiny model and a few steps (for tests)")
    p.add_argument("--force_pretrain", action="store_true", help="retrain the upstream backbone")
    p.add_argument("--quiet", action="store_true", help="no per-step progress line (stderr)")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    run(a.workdir, methods=methods, quick=a.quick, seed=a.seed, force_pretrain=a.force_pretrain,
        progress=not a.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
