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
%matplotlib inline
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
    c = jax_peft.train.default_config()
    c.model.name, c.model.checkpoint = "", "random"    # random init with the architecture below
    c.model.update(dict(patch_size=4, hidden_size=64, num_layers=2, num_heads=2, mlp_dim=128,
                        image_size=IMAGE_SIZE))
    c.method = jax_peft.train.method_config("full")
    c.data.update(dict(name="synthetic/upstream", train_split="train", eval_split="val",
                       image_size=IMAGE_SIZE))
    c.optimizer.update(dict(name="adamw", lr=2e-3, weight_decay=0.05, grad_clip_norm=1.0))
    c.schedule.update(dict(kind="cosine", warmup_steps=20, warmup_lr=0.0, min_lr=1e-5))
    c.update(dict(batch_size=64, total_steps=steps, eval_every=0, log_every=50, seed=0,
                  checkpoint_every=steps, keep_checkpoints=1, keep_best=False,
                  export_merged=True, progress=False))
    summary = jax_peft.train.train_and_evaluate(c, os.path.join(CACHE, "pretrain_run"))
    print(f"pretrained {summary['steps']} steps: upstream val accuracy "
          f"{summary['final_eval_accuracy']:.3f} (chance 1/24 = 0.042)")
    shutil.copy(summary["merged_checkpoint"], path + ".tmp")
    os.replace(path + ".tmp", path)   # atomic: a half-written file is never cached
    return path


def adapt_config(method: str, backbone: str, *, steps: int, lr: float, seed: int = 0, **hparams):
    """The training config adapting `backbone` to `synthetic/downstream` (colour of the LEFT of
    two objects, 8 classes) with `method`."""
    c = jax_peft.train.default_config()
    c.model.update(dict(name="", checkpoint=backbone, image_size=IMAGE_SIZE))
    c.method = jax_peft.train.method_config(method, **hparams)
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
           training loop (`jax_peft.train.train_and_evaluate`: jit steps, optax, orbax checkpoints);
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
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))   # one compilation per shape
        x = jax.random.normal(jax.random.PRNGKey(1), (4, IMAGE_SIZE, IMAGE_SIZE, 3))
        logits = forward(params, x)
        official = forward(method.apply(params, adapter), x)
        print(f"official init: max |logit change| at step 0 = {float(jnp.max(jnp.abs(official - logits))):.3g}")
        ident = jax_peft.get_method("rlrr", init="identity")
        same = np.array_equal(logits, forward(ident.apply(params, ident.init(jax.random.PRNGKey(0), params)), x))
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
        summary = jax_peft.train.train_and_evaluate(config, run_dir)
        print(json.dumps({k: summary[k] for k in ("method", "trainable_params", "trainable_params_with_head",
                                                  "steps", "final_eval_accuracy")}, indent=1))
        # jax_peft.train.evaluate(config, run_dir, split="test") evaluates the checkpoint on the 2000 held-out
        # test images; section 4 measures the exported model on 512 of them instead (faster).
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
        base, method, adapter, info = jax_peft.analysis.load_run(run_dir)
        merged = jax.device_get(jax_peft.merge(base, method, adapter))
        export_path = os.path.join(RUNS, "rlrr_merged.npz")
        jax_peft.save_checkpoint(export_path, merged)
        reloaded = jax_peft.load_checkpoint(export_path)
        print("exported", export_path, f"({os.path.getsize(export_path) / 1e3:.0f} kB),",
              "same leaves as the backbone:", paths.leaf_paths(reloaded) == paths.leaf_paths(merged))

        batch = next(jax_peft.make_dataset("synthetic/downstream", "test", batch_size=512, image_size=IMAGE_SIZE,
                                           train=False))
        model = jax_peft.ViT(jax_peft.vit_config(reloaded))
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
        adapted_logits = forward(method.apply(base, adapter), batch["image"])   # adapter applied on the fly
        merged_logits = forward(reloaded, batch["image"])                       # plain ViT weights
        diff = float(jnp.max(jnp.abs(adapted_logits - merged_logits)))
        agree = float(jnp.mean(jnp.argmax(adapted_logits, -1) == jnp.argmax(merged_logits, -1)))
        acc = float(jnp.mean(jnp.argmax(merged_logits, -1) == batch["label"]))
        print(f"max |logit difference| adapted vs reloaded export: {diff:.2e}; argmax agreement {agree:.3f}; "
              f"held-out test accuracy of the export on {len(batch['label'])} images {acc:.3f} (chance 0.125)")
        assert diff < 1e-4 and agree == 1.0, "the merged export must reproduce the adapted model"
        """),
        md("""
        The export reproduces the adapted model to float32 rounding, so deployment costs nothing
        extra: RLRR adds no parameters or FLOPs at inference once merged.

        Next: `02_pytree_surgery.ipynb` (selecting, replacing and converting parameters) and
        `03_spectral_lens.ipynb` (what RLRR, FacT-TT and LoRA do to the weights' singular values).
        For the real thing, swap the backbone for `jax_peft.load_checkpoint("ViT-B_16")` and use
        `jax_peft.configs.vtab1k` or `jax_peft.configs.fgvc`.
        """),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def surgery() -> nbformat.NotebookNode:
    cells = [
        md("""
        # 02 · Parameter-pytree surgery

        Parameters in jax_peft are plain nested dicts of arrays with Linen names
        (`Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel`, ...), so everything
        below is a pure function from trees to trees: inspect, select by regex, replace a head, resize
        the position embedding for a new image size, and convert adapters to and from the official
        PyTorch layouts. No training; runs in seconds.
        """),
        code("""
        import os

        import jax
        import jax.numpy as jnp
        import numpy as np

        import jax_peft
        from jax_peft import paths

        # A tiny ViT in the Google .npz layout (random weights; any real checkpoint works the same way).
        cfg = jax_peft.vit_config("ViT-B/16", num_classes=10, image_size=32, patch_size=8, hidden_size=64,
                                  num_layers=2, num_heads=2, mlp_dim=128)
        jax_peft.save_checkpoint("tiny_vit.npz", jax_peft.init_params(cfg, 0))
        params = jax_peft.load_checkpoint("tiny_vit.npz")
        with np.load("tiny_vit.npz") as f:
            print("layout on disk:", jax_peft.detect_layout(f.files), "| e.g.", sorted(f.files)[:2])
        print(jax_peft.vit_config(params))
        """),
        md("""
        ## Inspect

        `paths.summarize` tabulates path, shape, dtype and size; `paths.count` counts scalars. Shapes of a
        full-size model come from `jax_peft.param_shapes` (via `jax.eval_shape`, nothing allocated).
        """),
        code("""
        print(paths.summarize(params, max_rows=14))
        vit_b = jax_peft.param_shapes(jax_peft.vit_config("ViT-B/16"))
        print(f"ViT-B/16: {paths.count(vit_b):,} parameters in {len(paths.leaf_paths(vit_b))} leaves "
              f"(abstract: {type(jax.tree_util.tree_leaves(vit_b)[0]).__name__})")
        """),
        md("""
        ## Select by regex

        `paths.select(tree, pattern)` returns the '/'-joined paths matched by `re.search`; `paths.mask`
        turns the same patterns into a bool tree (e.g. for `optax.masked`). A pattern that matches
        nothing is an error, not a silent no-op: a typo would otherwise freeze or train the wrong thing.
        """),
        code("""
        attn_kernels = paths.select(params, r"MultiHeadDotProductAttention_0/(query|value)/kernel$")
        print("\\n".join(attn_kernels))
        biases_and_norms = paths.mask(params, [r"/bias$", r"LayerNorm|encoder_norm"])
        n_true = sum(paths.count(paths.get(params, p)) for p, m in paths.flatten(biases_and_norms).items() if m)
        print(f"bias + norm parameters (BitFit-like selection): {n_true:,} of {paths.count(params):,}")
        """),
        code("""
        try:
            paths.select(params, r"encoderblock_\\d+/Attention/query")   # wrong module name
        except ValueError as e:
            print("ValueError:", e)
        """),
        md("""
        ## Replace a head, edit leaves

        `jax_peft.reset_head` gives a fresh head for a new number of classes with the initializer of
        the method you fine-tune with (`zeros` as vit_jax/RLRR, `torch_linear` as FacT/EFFT,
        `trunc_normal` as timm/SSF). `paths.replace` swaps any leaves by path. Both return new trees:
        the input is untouched.
        """),
        code("""
        p5 = jax_peft.reset_head(params, num_classes=5, init="torch_linear", rng=jax.random.PRNGKey(0))
        print("head:", {k: v.shape for k, v in params["head"].items()}, "->", {k: v.shape for k, v in p5["head"].items()})
        path = "Transformer/encoder_norm/scale"
        p_edit = paths.replace(params, {path: 2.0 * paths.get(params, path)})
        print("edited", path, "| original unchanged:", bool(np.all(paths.get(params, path) == 1.0)),
              "| copy doubled:", bool(np.all(paths.get(p_edit, path) == 2.0)))
        print("pre_logits present:", "pre_logits" in params, "-> drop_pre_logits keys:", sorted(jax_peft.drop_pre_logits(params)))
        """),
        md("""
        ## Resize the position embedding to a new image size

        vit_jax's rule: keep the CLS row, reshape the patch rows to their grid, resample bilinearly with
        corners aligned. 32 px with patch 8 is a 4×4 grid (17 tokens); 48 px is 6×6 (37 tokens).
        The corners of the grid are kept exactly, and the resized model runs at the new size.
        """),
        code("""
        p48 = jax_peft.resize_pos_embedding(params, image_size=48)
        pe_old = params["Transformer"]["posembed_input"]["pos_embedding"]
        pe_new = p48["Transformer"]["posembed_input"]["pos_embedding"]
        print("pos_embedding:", pe_old.shape, "->", pe_new.shape)
        g_old, g_new = pe_old[0, 1:].reshape(4, 4, -1), pe_new[0, 1:].reshape(6, 6, -1)
        corners = [(0, 0), (0, -1), (-1, 0), (-1, -1)]
        print("CLS row kept:", np.array_equal(pe_old[0, 0], pe_new[0, 0]),
              "| grid corners kept:", all(np.allclose(g_old[c], g_new[c], atol=1e-6) for c in corners))
        model48 = jax_peft.ViT(jax_peft.vit_config(p48))
        logits = jax.jit(lambda p, x: model48.apply({"params": p}, x, train=False))(p48, jnp.zeros((2, 48, 48, 3)))
        print("forward at 48 px:", logits.shape)
        """),
        md("""
        ## Adapters to and from the official PyTorch layouts

        `jax_peft.to_official(name, adapter, **hparams)` returns the flat `{name: array}` state dict of the
        method's official repository (names, shapes, transposes as PyTorch stores them);
        `jax_peft.from_official(name, state_dict, params, **hparams)` reads one (torch tensors accepted;
        backbone and head keys are ignored). We perturb freshly initialized adapters with noise, so the
        check is not on zeros, and require the round trip to be **bitwise** exact for RLRR and FacT-TT.
        """),
        code("""
        def noisy(tree, seed):
            leaves, treedef = jax.tree_util.tree_flatten(tree)
            keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
            return jax.tree_util.tree_unflatten(
                treedef, [np.asarray(x + 0.1 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)])

        for name, hp in [("rlrr", {}), ("fact_tt", dict(rank=8, scale=1.0))]:
            method = jax_peft.get_method(name, **hp)
            adapter = noisy(method.init(jax.random.PRNGKey(0), params), seed=1)
            state_dict = jax_peft.to_official(name, adapter, **hp)
            back = jax_peft.from_official(name, state_dict, params, **hp)
            fa, fb = paths.flatten(adapter), paths.flatten(back)          # compare leaf by leaf, by path
            exact = sorted(fa) == sorted(fb) and all(np.array_equal(fa[p], np.asarray(fb[p])) for p in fa)
            print(f"{name}: {len(state_dict)} official tensors, {method.num_params(adapter):,} parameters; "
                  f"round trip bitwise exact: {exact}")
            for k in list(state_dict)[:4]:
                print(f"    {k:45s} {tuple(state_dict[k].shape)}")
            assert exact, name
        """),
        md("""
        Because the official layouts round-trip exactly, an adapter trained here can be loaded into the
        official PyTorch code (and vice versa), e.g. to compare with published checkpoints.
        """),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def spectral_lens() -> nbformat.NotebookNode:
    cells = [
        md("""
        # 03 · The spectral lens: what RLRR, FacT-TT and LoRA do to the weights

        RLRR's paper views PEFT methods through the singular value decomposition of the adapted weights;
        EFFT and LoRA compare adapters through the overlap of their top singular subspaces. Here we train
        the three methods briefly on the demo's `synthetic/downstream` task from the same tiny pretrained
        backbone (notebook 01's, cached), merge each adapter (`jax_peft.merge`) and look at
        ΔW = W' − W for every adapted matrix (blocks × q, k, v, o, fc1, fc2) with `jax_peft.analysis`:

        * `spectral_lens(params, method, adapter)`: σ(W), σ(W'), σ(ΔW), ‖ΔW‖, rank and effective rank of
          ΔW, principal angles between the top-k singular subspaces of W and W';
        * `adapter_similarity(params, run_a, run_b)`: φ(A, B, i, j) = ‖U_Aᵢᵀ U_Bⱼ‖²_F / min(i, j) between
          the top singular vectors of two adapters' ΔW.

        Everything is tiny (width 64, 2 blocks, 100 steps per method, one seed): read the plots as a
        demonstration of the tools, not as findings about the methods.
        """),
        code(SETUP.replace("{name}", "03_spectral_lens")),
        code(BACKBONE),
        md("""
        ## Train three adapters (same backbone, data, steps and seed)

        The learning rates are the demo's (`jax_peft.configs.demo`); FacT-TT and LoRA use rank 8, LoRA on
        q, k, v as in its paper. `analysis.load_run` restores each trained adapter and the frozen base.
        """),
        code("""
        RECIPES = {
            "rlrr": (1e-2, {}),
            "fact_tt": (5e-3, dict(rank=8, scale=1.0, dropout=0.0)),
            "lora": (5e-3, dict(rank=8, dropout=0.0, targets=("q", "k", "v"))),
        }
        runs = {}
        for name, (lr, hp) in RECIPES.items():
            summary = jax_peft.train.train_and_evaluate(adapt_config(name, BACKBONE_PATH, steps=100, lr=lr, **hp),
                                                  os.path.join(RUNS, name))
            base, method, adapter, _ = jax_peft.analysis.load_run(os.path.join(RUNS, name))
            runs[name] = (method, adapter)
            print(f"{name:8s} {summary['trainable_params']:6,} adapter parameters   "
                  f"val accuracy {summary['final_eval_accuracy']:.3f} (chance 0.125)")
        # `base` is the frozen backbone (+ the last run's head, which the lens ignores): the same for all runs.
        """),
        md("""
        ## ‖ΔW‖ per block and module

        `spectral_lens` merges the adapter and computes every statistic batched over blocks with
        `jnp.linalg.svd`. The heatmaps show the relative change ‖ΔW‖_F / ‖W‖_F (`analysis.plots` writes
        the same figures as PNG files; see the last section).
        """),
        code("""
        from jax_peft import analysis
        from jax_peft.analysis import plots

        # spectral_lens(base, method, adapter) is compare(base, merge(base, method, adapter)); we merge once
        # and reuse the merged trees for the φ grids below.
        merged = {name: jax_peft.merge(base, m, a) for name, (m, a) in runs.items()}
        spectra = {name: analysis.compare(base, merged[name], k=4) for name in runs}

        fig, axes = plt.subplots(1, 3, figsize=(12, 2.6))
        for ax, (name, sp) in zip(axes, spectra.items()):
            grid, modules, blocks = plots.heatmap_values(sp, "delta_rel")
            im = ax.imshow(grid, aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(modules)), modules); ax.set_yticks(range(len(blocks)), blocks)
            ax.set_xlabel("module"); ax.set_ylabel("block"); ax.set_title(f"{name}: ‖ΔW‖ / ‖W‖")
            fig.colorbar(im, ax=ax)
        fig.tight_layout(); plt.show()

        """),
        md("""
        ## Rank of ΔW, and how far the top singular subspaces of W move

        `delta_rank` is the numerical rank of ΔW (float32 rounding noise excluded), `delta_erank` its
        effective rank (exp of the entropy of the normalized singular values), `overlap_left` the mean
        cos² of the principal angles between the top-4 input-space singular vectors of W and W'
        (1 = unchanged subspace).
        """),
        code("""
        print(f"{'method':8s} {'module':6s} {'block':>5s} {'‖ΔW‖/‖W‖':>9s} {'rank ΔW':>8s} {'erank ΔW':>9s} "
              f"{'max|Δσ/σ|':>9s} {'overlap':>8s}")
        for name, sp in spectra.items():
            for row in analysis.table(sp):
                print(f"{name:8s} {row['module']:6s} {row['block']:5d} {row['delta_rel']:9.4f} {row['delta_rank']:8d} "
                      f"{row['delta_erank']:9.2f} {row['max_abs_rel_change']:9.4f} {row['overlap_left']:8.4f}")

        # RLRR's official initialization is not the identity (random s_in, s_out): how much of its ΔW is there
        # before any training?
        m, _ = runs["rlrr"]
        at_init = analysis.spectral_lens(base, m, m.init(jax.random.PRNGKey(1), base), k=4)
        mean_rel = lambda sp: np.mean([r["delta_rel"] for r in analysis.table(sp)])
        print(f"\\nrlrr mean ‖ΔW‖/‖W‖: at an official init {mean_rel(at_init):.3f}, after training {mean_rel(spectra['rlrr']):.3f}")

        # Structural facts that hold for any training run (checked, not just printed):
        lora_rows = analysis.table(spectra["lora"])
        assert all(r["delta_rank"] <= 8 for r in lora_rows), "LoRA's ΔW has rank <= its rank 8"
        assert all(r["delta_fro"] == 0 for r in lora_rows if r["module"] not in ("q", "k", "v")), "LoRA leaves o/fc1/fc2 alone"
        assert all(r["delta_rank"] <= 8 for r in analysis.table(spectra["fact_tt"])), "FacT-TT's ΔW has rank <= 8"
        """),
        md("""
        ## Spectra before and after (block 0, query)

        σ(W) and σ(W') on a log scale with σ(ΔW) below them, and the relative change of each singular
        value. A low-rank ΔW shows up as a σ(ΔW) curve that drops to the rounding floor after r values.
        """),
        code("""
        fig, axes = plt.subplots(1, 3, figsize=(12, 2.8), sharey=True)
        for ax, (name, sp) in zip(axes, spectra.items()):
            q = sp["q"]
            idx = np.arange(1, q.s_base.shape[1] + 1)
            ax.semilogy(idx, q.s_base[0], label="σ(W)")
            ax.semilogy(idx, q.s_adapted[0], "--", label="σ(W')")
            ax.semilogy(idx, np.maximum(q.delta_s[0], 1e-9), ":", label="σ(ΔW)")
            ax.set_title(f"{name}: block 0, q"); ax.set_xlabel("index i")
        axes[0].set_ylabel("singular value"); axes[0].legend(fontsize=8)
        fig.tight_layout(); plt.show()
        """),
        md("""
        ## φ similarity between adapters

        φ(A, B, i, j) compares the top-i singular directions of ΔW_A with the top-j of ΔW_B (input space,
        as the LoRA and EFFT papers do for the down-projection): 1 when one subspace contains the other,
        about max(i, j)/d for random subspaces of ℝ^d (here d = 64, so 1/64 to 8/64 ≈ 0.02–0.13).
        NaN where i or j exceeds the numerical rank of ΔW.
        """),
        code("""
        I = (1, 2, 4, 8)
        pairs = [("lora", "fact_tt"), ("lora", "rlrr"), ("fact_tt", "rlrr")]
        # run_a / run_b: a (method, adapter) pair, or a merged tree as here (e.g. also a fully fine-tuned model)
        sims = {pair: analysis.adapter_similarity(base, merged[pair[0]], merged[pair[1]], i_values=I, modules=("q",))["q"]
                for pair in pairs}
        d = spectra["lora"]["q"].shape[0]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3))
        for ax, ((a, b), g) in zip(axes, sims.items()):
            im = ax.imshow(g[0], vmin=0, vmax=1, cmap="magma", origin="lower")
            ax.set_xticks(range(len(I)), I); ax.set_yticks(range(len(I)), I)
            ax.set_xlabel(f"j ({b})"); ax.set_ylabel(f"i ({a})"); ax.set_title(f"φ, block 0, q: {a} vs {b}", fontsize=9)
            for (r, c), v in np.ndenumerate(g[0]):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        fig.colorbar(im, ax=axes.tolist()); plt.show()

        random_level = np.array([[max(i, j) / d for j in I] for i in I])
        for (a, b), g in sims.items():
            print(f"{a} vs {b}: mean φ over the grid and blocks {np.nanmean(g):.3f} "
                  f"(random subspaces: {random_level.mean():.3f}); φ(1, 1) per block {np.round(g[:, 0, 0], 3)}")
        """),
        md("""
        ## The same figures as PNG files

        `jax_peft.analysis.plots` writes each figure as a PNG (what `python -m jax_peft.analysis RUN_DIR`
        puts in its markdown report). It renders off-screen with matplotlib's Agg backend, so we call it
        after the inline figures.
        """),
        code("""
        written = [
            plots.heatmap(spectra["rlrr"], os.path.join(RUNS, "rlrr_delta_rel.png"), value="delta_rel"),
            plots.spectrum(spectra["lora"], "q", 0, os.path.join(RUNS, "lora_q_block0_spectrum.png")),
            plots.similarity_grid(sims[pairs[0]][0], I, I, os.path.join(RUNS, "phi_lora_fact_tt_q0.png"),
                                  title="φ(LoRA, FacT-TT), block 0, q", labels=("i (LoRA)", "j (FacT-TT)")),
        ]
        for path in written:
            print(f"{os.path.getsize(path) / 1e3:6.1f} kB  {path}")
        """),
        md("""
        ## What this shows, and what it does not

        *Structure, which holds for any run:* LoRA's ΔW is exactly zero outside q, k, v and has rank at
        most 8; FacT-TT's ΔW has rank at most 8 in every matrix, with the rank-8 factors U, V shared
        by all of them. RLRR's rescaling of W is a Hadamard product with a rank-one matrix,
        W ⊙ (s_in s_outᵀ) = diag(s_in) W diag(s_out), so its ΔW has, in general, the full rank of W
        even though it trains about as few parameters: "low rank" in RLRR describes the rescaling, not
        the weight update. The tables above show these ranks numerically.

        *Magnitudes and subspaces, which depend on this run:* after 100 steps from a tiny backbone,
        the relative changes ‖ΔW‖/‖W‖ and the rotation of W's top singular subspaces are what the
        heatmaps and tables show. RLRR's are much larger than FacT-TT's or LoRA's, but the line under
        the table shows why: most of RLRR's ΔW is already there at its official (random, non-identity)
        initialization (in our runs about 0.24 at init and 0.25 after training), so ‖ΔW‖ measures the
        initialization more than what was learned; `get_method("rlrr", init="identity")` starts from
        ΔW = 0 if you want the lens to show only the learned part. The φ grids compare three different
        methods after one short run each, against the random-subspace level printed beside them; a φ
        above that level says the two adapters moved some of the same input directions of W_q, on this
        toy task, in this run.

        *What it does not show:* anything about ViT-B/16 on real data. The width (64), depth (2),
        training length (100 steps) and the single seed are far from the papers' settings; φ between two
        seeds of one method (LoRA's analysis) and between methods on VTAB-1k would need real runs (train
        with `jax_peft.configs.vtab1k`, then `python -m jax_peft.analysis RUN_DIR` writes this report, PNG and
        markdown, for a real run).
        """),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def _metadata() -> dict:
    return {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"}}


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_pytree_surgery.ipynb": surgery,
    "03_spectral_lens.ipynb": spectral_lens,
}


def main() -> None:
    for name, build in NOTEBOOKS.items():
        nb = build()
        for i, cell in enumerate(nb.cells):   # stable ids: regenerating gives no diff
            cell["id"] = f"cell-{i:02d}"
        nbformat.validate(nb)
        path = os.path.join(HERE, name)
        with open(path, "w") as f:
            nbformat.write(nb, f)
        print("wrote", path)


if __name__ == "__main__":
    main()
