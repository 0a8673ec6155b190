"""Writes the three notebooks (without outputs) from the cell sources below: `python notebooks/make_notebooks.py`.

Edit the cells here, regenerate, and commit both this file and the .ipynb files. The notebooks are
executed by `tests/test_notebooks.py`.
"""

from __future__ import annotations

import os
import textwrap

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip())


# --- pieces shared by the notebooks that train (one source, copied into each notebook) ---------
SETUP = """
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import matplotlib.pyplot as plt

import jax_peft
from jax_peft import paths

# The pretrained backbone is cached here and shared between notebooks (the test sets this variable
# to one temporary directory for all three notebooks).
CACHE = os.path.abspath(os.environ.get("JAX_PEFT_NOTEBOOK_CACHE", "notebook_cache"))
RUNS = os.path.abspath("notebook_runs/{name}")
IMAGE_SIZE = 16          # 16x16 images, patch 4: a 4x4 grid of tokens + CLS
os.makedirs(CACHE, exist_ok=True)
shutil.rmtree(RUNS, ignore_errors=True)
print("jax", jax.__version__, "| devices:", jax.devices())
"""

BACKBONE = '''
def pretrained_backbone(steps: int = 150) -> str:
    """A tiny ViT (patch 4, width 64, 2 blocks, 16x16 images) pretrained from scratch with full
    fine-tuning on `synthetic/upstream` (colour x texture of one object, 24 classes), exported as a
    Google-layout .npz. Cached in CACHE, so only the first notebook pays for it."""
    path = os.path.join(CACHE, f"upstream_vit_p4_w64_d2_{IMAGE_SIZE}px_{steps}steps.npz")
    if os.path.exists(path):
        print("cached backbone:", path)
        return path
    c = jax_peft.default_config()
    c.model.name, c.model.checkpoint = "", "random"    # random init with the architecture below
    c.model.update(dict(patch_size=4, hidden_size=64, num_layers=2, num_heads=2, mlp_dim=128,
                        image_size=IMAGE_SIZE))
    c.method = jax_peft.method_config("full")
    c.data.update(dict(name="synthetic/upstream", train_split="train", eval_split="val",
                       image_size=IMAGE_SIZE))
    c.optimizer.update(dict(name="adamw", lr=2e-3, weight_decay=0.05, grad_clip_norm=1.0))
    c.schedule.update(dict(kind="cosine", warmup_steps=20, warmup_lr=0.0, min_lr=1e-5))
    c.update(dict(batch_size=64, total_steps=steps, eval_every=0, log_every=50, seed=0,
                  checkpoint_every=steps, keep_checkpoints=1, keep_best=False,
                  export_merged=True, progress=False))
    summary = jax_peft.train_and_evaluate(c, os.path.join(CACHE, "pretrain_run"))
    print(f"pretrained {summary['steps']} steps: upstream val accuracy "
          f"{summary['final_eval_accuracy']:.3f} (chance 1/24 = 0.042)")
    shutil.copy(summary["merged_checkpoint"], path + ".tmp")
    os.replace(path + ".tmp", path)   # atomic: a half-written file is never cached
    return path


def adapt_config(method: str, backbone: str, *, steps: int, lr: float, seed: int = 0, **hparams):
    """The training config adapting `backbone` to `synthetic/downstream` (colour of the LEFT of
    two objects, 8 classes) with `method`."""
    c = jax_peft.default_config()
    c.model.update(dict(name="", checkpoint=backbone, image_size=IMAGE_SIZE))
    c.method = jax_peft.method_config(method, **hparams)
    c.data.update(dict(name="synthetic/downstream", train_split="train", eval_split="val",
                       image_size=IMAGE_SIZE))
    c.optimizer.update(dict(name="adamw", lr=lr, weight_decay=1e-4, grad_clip_norm=1.0))
    c.schedule.update(dict(kind="cosine", warmup_steps=10, warmup_lr=0.0, min_lr=1e-5))
    c.update(dict(batch_size=64, total_steps=steps, eval_every=0, log_every=10, seed=seed,
                  checkpoint_every=steps, keep_checkpoints=1, keep_best=False, progress=False))
    return c


BACKBONE_PATH = pretrained_backbone()
'''


def quickstart() -> nbformat.NotebookNode:
    cells = [
        md("""
        # 01 · Quickstart: checkpoint → RLRR → train → merge → export

        The whole jax_peft workflow on a laptop CPU in well under a minute, with no download:

        1. **load a checkpoint**: a tiny ViT pretrained here on generated images (the demo's
           `synthetic/upstream` task) and saved as a Google-layout `.npz`, the same format as the
           original ViT checkpoints (`jax_peft.load_checkpoint("ViT-B_16")` reads those the same way);
        2. **adapt** it with RLRR (residual low-rank rescaling), a pure function of `(params, adapter)`;
        3. **train** the adapter and a new head on the demo's `synthetic/downstream` task with the real
           training loop (`jax_peft.train_and_evaluate`: jit steps, optax, orbax checkpoints);
        4. **merge** the adapter into plain ViT weights, **export** them as `.npz`, reload the export and
           check that its logits equal the adapted model's.

        Sizes are tiny on purpose (width 64, 2 blocks, 16×16 images, 150 + 100 steps); the numbers
        show that the pipeline works, not how RLRR compares with other methods on real benchmarks.
        """),
        code(SETUP.replace("{name}", "01_quickstart")),
        md("""
        ## 1 · A checkpoint

        `pretrained_backbone()` trains the backbone once (full fine-tuning from a random init, through
        the same training loop) and caches the exported `.npz`; later runs and the other notebooks
        reuse it. `adapt_config()` is the config used below for adaptation.
        """),
        code(BACKBONE),
        code("""
        params = jax_peft.load_checkpoint(BACKBONE_PATH)           # canonical nested tree of numpy arrays
        with np.load(BACKBONE_PATH) as f:
            print("stored key layout:", jax_peft.detect_layout(f.files), "| e.g.", sorted(f.files)[:3])
        cfg = jax_peft.vit_config(params)                          # architecture inferred from the tree
        jax_peft.validate_params(params, cfg)
        print(cfg)
        print(paths.summarize(params, max_rows=12))
        """),
        md("""
        ## 2 · Adapt with RLRR

        A method is a frozen dataclass of hyper-parameters. `init` creates the adapter pytree and
        `apply(params, adapter)` returns adapted parameters for the unchanged `ViT` module. Like the
        official code, RLRR's default initialization (random rescaling vectors) does *not* start at the
        pretrained function; `get_method("rlrr", init="identity")` is the variant that does, exactly.
        """),
        code("""
        method = jax_peft.get_method("rlrr")             # official hyper-parameters and initialization
        adapter = method.init(jax.random.PRNGKey(0), params)
        print(method.summary())
        print(f"adapter parameters: {method.num_params(adapter):,} "
              f"({100 * method.num_params(adapter) / paths.count(params):.1f}% of the backbone's {paths.count(params):,})")
        print(paths.summarize(adapter, max_rows=8))

        model = jax_peft.ViT(cfg)
        x = jax.random.normal(jax.random.PRNGKey(1), (4, IMAGE_SIZE, IMAGE_SIZE, 3))
        logits = model.apply({"params": params}, x, train=False)
        official = model.apply({"params": method.apply(params, adapter)}, x, train=False)
        print(f"official init: max |logit change| at step 0 = {float(jnp.max(jnp.abs(official - logits))):.3g}")
        ident = jax_peft.get_method("rlrr", init="identity")
        same = np.array_equal(logits, model.apply({"params": ident.apply(params, ident.init(jax.random.PRNGKey(0), params))},
                                                  x, train=False))
        print("init='identity': bitwise the pretrained logits at step 0:", same)
        """),
        md("""
        ## 3 · Train on the demo's downstream task

        `synthetic/downstream`: two objects, label = colour of the **left** one (8 classes). The frozen
        backbone knows colours, but its CLS token mixes both objects; adapting attention can select the
        left one. The config is a locked `ml_collections` schema: a typo in a key fails loudly.
        The loop trains only `{"adapter", "head"}` (the base is a frozen, non-differentiated argument),
        writes `metrics.jsonl` and an orbax checkpoint, and evaluates on the validation split.
        """),
        code("""
        config = adapt_config("rlrr", BACKBONE_PATH, steps=100, lr=1e-2)
        run_dir = os.path.join(RUNS, "rlrr")
        summary = jax_peft.train_and_evaluate(config, run_dir)
        print(json.dumps({k: summary[k] for k in ("method", "trainable_params", "trainable_params_with_head",
                                                  "steps", "final_eval_accuracy")}, indent=1))
        test = jax_peft.evaluate(config, run_dir, split="test")
        print(f"held-out test accuracy: {test['eval_accuracy']:.3f} (chance 1/8 = 0.125)")
        """),
        code("""
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            logs = [json.loads(line) for line in f]
        train = [r for r in logs if "loss" in r]
        fig, ax = plt.subplots(figsize=(5, 2.8))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train])
        ax.set_xlabel("step"); ax.set_ylabel("training loss"); ax.set_title("RLRR on synthetic/downstream")
        plt.show()
        """),
        md("""
        ## 4 · Merge, export, reload, check

        `jax_peft.analysis.load_run` restores the trained adapter and head from the orbax checkpoint and
        rebuilds the frozen base exactly as training did. `jax_peft.merge` folds the adapter into plain
        ViT weights (fp32, jitted): the result is an ordinary checkpoint that needs no jax_peft code to
        run, saved in the Google `.npz` layout.
        """),
        code("""
        from jax_peft.merge import merge   # (the function; see notebooks/README.md about `jax_peft.merge`)

        base, method, adapter, info = jax_peft.analysis.load_run(run_dir)
        merged = jax.device_get(merge(base, method, adapter))
        export_path = os.path.join(RUNS, "rlrr_merged.npz")
        jax_peft.save_checkpoint(export_path, merged)
        reloaded = jax_peft.load_checkpoint(export_path)
        print("exported", export_path, f"({os.path.getsize(export_path) / 1e3:.0f} kB),",
              "same leaves as the backbone:", paths.leaf_paths(reloaded) == paths.leaf_paths(merged))

        batch = next(jax_peft.make_dataset("synthetic/downstream", "test", batch_size=256, image_size=IMAGE_SIZE,
                                           train=False))
        model = jax_peft.ViT(jax_peft.vit_config(reloaded))
        adapted_logits = model.apply({"params": method.apply(base, adapter)}, batch["image"], train=False)
        merged_logits = model.apply({"params": reloaded}, batch["image"], train=False)
        diff = float(jnp.max(jnp.abs(adapted_logits - merged_logits)))
        agree = float(jnp.mean(jnp.argmax(adapted_logits, -1) == jnp.argmax(merged_logits, -1)))
        acc = float(jnp.mean(jnp.argmax(merged_logits, -1) == batch["label"]))
        print(f"max |logit difference| adapted vs reloaded export: {diff:.2e}; argmax agreement {agree:.3f}; "
              f"accuracy of the export on {len(batch['label'])} test images {acc:.3f}")
        assert diff < 1e-4 and agree == 1.0, "the merged export must reproduce the adapted model"
        """),
        md("""
        The export reproduces the adapted model to float32 rounding, so deployment costs nothing
        extra: RLRR adds no parameters or FLOPs at inference once merged.

        Next: `02_pytree_surgery.ipynb` (selecting, replacing and converting parameters) and
        `03_spectral_lens.ipynb` (what RLRR, FacT-TT and LoRA do to the weights' singular values).
        For the real thing, swap the backbone for `jax_peft.load_checkpoint("ViT-B_16")` and use
        `configs/vtab1k.py` or `configs/fgvc.py`.
        """),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def _metadata() -> dict:
    return {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"}}


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
}


def main() -> None:
    for name, build in NOTEBOOKS.items():
        nb = build()
        nbformat.validate(nb)
        path = os.path.join(HERE, name)
        with open(path, "w") as f:
            nbformat.write(nb, f)
        print("wrote", path)


if __name__ == "__main__":
    main()
