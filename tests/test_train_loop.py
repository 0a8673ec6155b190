"""The training loop on jax_peft.configs.smoke (tiny model, generated data): outputs, exact resume after a
real SIGTERM, checkpoint contents, corrupted-checkpoint fallback, eval mode and config validation."""

import json
import os
import signal
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

import jax_peft
from jax_peft import paths
from jax_peft.configs import smoke
from jax_peft.train import checkpointing, loop, model_setup
from jax_peft.train.config import default_config, method_config

ROOT = Path(__file__).resolve().parents[1]


def smoke_config(**overrides):
    c = smoke.get_config("bitfit")
    c.model.num_layers = 1
    c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 16, 8, 100, 1
    c.progress = False
    for k, v in overrides.items():
        node = c
        *parents, last = k.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, last, v)
    return c


def _records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _final_trainable(workdir):
    ck = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    state, meta = ck.restore()
    ck.close()
    return meta, jax.device_get(state)


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """The runs of this module compile the same programs: a persistent compilation cache (a
    temporary directory, this module only) lets the later runs skip XLA compilation."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 16-step smoke run."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    summary = loop.train_and_evaluate(smoke_config(), workdir)
    return workdir, summary


def test_outputs_of_an_uninterrupted_run(straight):
    workdir, summary = straight
    recs = _records(workdir)
    assert [r["step"] for r in recs] == list(range(1, 17))
    assert all(np.isfinite(r["loss"]) and "lr" in r for r in recs)
    assert [r["step"] for r in recs if "eval_accuracy" in r] == [8, 16]
    on_disk = json.load(open(os.path.join(workdir, "summary.json")))
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("method", "trainable_params", "best_eval_accuracy", "final_eval_accuracy", "steps", "wall_time_s"):
        assert key in summary
    assert summary["method"] == "bitfit" and summary["steps"] == 16
    assert 0 < summary["input_wait_s"] and 0 < summary["input_wait_fraction"] < 1  # time in next(data)
    assert summary["final_eval_accuracy"] == recs[-1]["eval_accuracy"]
    assert summary["best_eval_accuracy"] == max(r["eval_accuracy"] for r in recs if "eval_accuracy" in r)
    assert json.load(open(os.path.join(workdir, "config.json")))["method"]["name"] == "bitfit"


def test_checkpoint_holds_trainable_state_only(straight):
    workdir, summary = straight
    config = smoke_config()
    meta, state = _final_trainable(workdir)
    assert meta["step"] == 16 and meta["data_position"] == 16
    assert set(state) == {"step", "trainable", "opt_state"}
    assert set(state["trainable"]) == {"adapter", "head"}
    n_trainable = paths.count(state["trainable"])
    assert n_trainable == summary["trainable_params_with_head"]
    # AdamW: mu and nu per trainable scalar, plus step counters; no frozen base weights anywhere.
    assert paths.count(state["opt_state"]) <= 2 * n_trainable + 8
    base = paths.count(jax_peft.param_shapes(model_setup.random_config(config, 4)))
    assert base > 10 * n_trainable
    # Array data only (orbax's chunk files live in `d/` directories; its JSON metadata, ~35 KB here and
    # varying from run to run, does not): float32 base weights alone would take 4 * base bytes.
    files = [f for f in Path(workdir, "checkpoints", "16").rglob("*") if f.is_file()]
    data = sum(f.stat().st_size for f in files if f.parent.name == "d")
    assert 0 < data < 4 * base, (data, 4 * base)


def test_sigterm_then_rerun_is_bit_identical(straight, tmp_path, monkeypatch):
    """A real SIGTERM (sent to this process while the 6th train batch is loaded) stops the run at
    step 6 with a checkpoint; the rerun resumes and matches the uninterrupted run bitwise."""
    ref_dir, _ = straight
    config = smoke_config()
    workdir = str(tmp_path / "resumed")
    make_dataset = loop.model_setup.make_dataset

    def sigterm_at_batch_6(config, split, *, train, **kwargs):
        it = make_dataset(config, split, train=train, **kwargs)
        if not train:
            return it

        def gen():
            for i, batch in enumerate(it, start=kwargs.get("start_batch", 0)):
                if i == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch
        return gen()

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the loop must handle it, or pytest dies
    try:
        with monkeypatch.context() as m:
            m.setattr(loop.model_setup, "make_dataset", sigterm_at_batch_6)
            first = loop.train_and_evaluate(config, workdir)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert first == {"preempted": True, "step": 6}
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    assert [r["step"] for r in _records(workdir)] == list(range(1, 7))

    second = loop.train_and_evaluate(config, workdir)
    assert second["steps"] == 16
    ref, res = _records(ref_dir), _records(workdir)
    assert [r["step"] for r in res] == list(range(1, 17))
    assert [r["loss"] for r in res] == [r["loss"] for r in ref]  # bitwise
    assert [r.get("eval_accuracy") for r in res] == [r.get("eval_accuracy") for r in ref]
    (_, a), (_, b) = _final_trainable(ref_dir), _final_trainable(workdir)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_resume_replays_the_dropout_keys_of_an_uninterrupted_run(tmp_path):
    """LoRA with dropout 0.5 (BitFit above has none, so it cannot see a resume that draws other
    masks): 4 steps straight vs 2 steps, stop, restore, 2 steps give bit-identical losses."""
    def config():
        c = smoke_config(total_steps=4, eval_every=0, batch_size=8, **{
            "schedule.warmup_steps": 1, "model.image_size": 16, "data.image_size": 16})
        c.method = method_config("lora", rank=2, dropout=0.5)
        return c

    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    loop.train_and_evaluate(config(), straight_dir)
    assert loop.train_and_evaluate(config(), resumed_dir, stop_at=2) == {"preempted": True, "step": 2}
    assert loop.train_and_evaluate(config(), resumed_dir)["steps"] == 4
    ref, res = _records(straight_dir), _records(resumed_dir)
    assert [r["step"] for r in res] == [1, 2, 3, 4]
    assert [r["loss"] for r in res] == [r["loss"] for r in ref]  # bitwise, the resumed steps 3, 4 included


def test_eval_mode_reproduces_the_final_accuracy(straight):
    workdir, summary = straight
    out = loop.evaluate(smoke_config(), workdir)
    assert out["step"] == 16 and out["eval_accuracy"] == summary["final_eval_accuracy"]


def test_eval_merges_the_adapter_once_per_pass():
    """An evaluation pass merges the adapter (`method.apply`) once, then runs plain forwards of the
    merged tree per batch; its accuracy and loss are the weight-form logits' over the split."""
    import dataclasses

    from jax_peft.methods import activation

    s = loop.setup(smoke_config(**{"method": method_config("rlrr"), "batch_size": 64}))
    calls = {"merge": 0, "eval": 0}

    def counted(name):
        fn = getattr(s.runner, name)
        return lambda *a: (calls.__setitem__(name, calls[name] + 1), fn(*a))[1]

    s = dataclasses.replace(s, runner=dataclasses.replace(s.runner, merge=counted("merge"), eval=counted("eval")))
    trainable = jax.tree_util.tree_map(lambda x: x + 0.1, s.trainable)  # a non-identity adapter
    state = s.runner.put_state({**s.init_state(), "trainable": trainable})
    ev = loop.run_eval(s, state, s.device_frozen())
    assert calls == {"merge": 1, "eval": 4}, calls  # 256 val examples in batches of 64

    params = loop.step_lib.join_params(s.frozen, trainable)
    correct = loss = 0.0
    weight_form = jax.jit(lambda p, a, x: activation.forward(s.model, s.method, p, a, x, form="weight"))
    for batch in model_setup.make_dataset(s.config, "val", train=False, normalize=True):  # float32
        logits = weight_form(params, trainable["adapter"], batch["image"])
        correct += float(np.sum(np.argmax(logits, -1) == batch["label"]))
        loss += float(np.sum(loop.step_lib.cross_entropy(logits, batch["label"])))
    assert ev["eval_examples"] == 256 and ev["eval_accuracy"] == correct / 256
    np.testing.assert_allclose(ev["eval_loss"], loss / 256, rtol=1e-5)


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    state = {"step": np.int32(1), "trainable": {"adapter": {"w": np.arange(6, dtype=np.float32)}}}
    ck = checkpointing.Checkpointer(str(tmp_path / "ck"), keep=3)
    ck.save(state, data_position=1)
    ck.save({"step": np.int32(2), "trainable": {"adapter": {"w": np.ones(6, np.float32)}}}, data_position=2)
    assert ck.save({"step": np.int32(2), "trainable": {"adapter": {"w": np.ones(6, np.float32)}}},
                   data_position=2) is False  # a step is written once
    ck.close()
    # A save killed midway leaves only a temporary directory, which is ignored.
    (tmp_path / "ck" / "3.orbax-checkpoint-tmp-123").mkdir()
    # Corrupt step 2: truncate every data file of its state item.
    for f in (tmp_path / "ck" / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    abstract = jax.eval_shape(lambda: jax.tree_util.tree_map(np.asarray, state))
    ck = checkpointing.Checkpointer(str(tmp_path / "ck"), keep=3)
    assert ck.all_steps()[-1] == 2
    with pytest.warns(checkpointing.CheckpointCorruptedWarning, match="step 2.*falling back to step 1"):
        restored, meta = ck.restore(abstract)
    assert meta["step"] == 1
    np.testing.assert_array_equal(restored["trainable"]["adapter"]["w"], np.arange(6, dtype=np.float32))
    # The unreadable step is set aside (kept for inspection) and can be written again.
    assert ck.all_steps() == [1] and (tmp_path / "ck" / "corrupted_2").is_dir()
    assert ck.save({"step": np.int32(2), "trainable": {"adapter": {"w": np.ones(6, np.float32)}}},
                   data_position=2)
    assert ck.restore(abstract)[1]["step"] == 2
    ck.close()


def test_keeps_last_n_and_best(tmp_path):
    ck = checkpointing.Checkpointer(str(tmp_path / "ck"), keep=2, keep_best=True)
    accs = {1: 0.5, 2: 0.9, 3: 0.6, 4: None, 5: 0.7}
    for step, acc in accs.items():
        ck.save({"step": np.int32(step), "w": np.zeros(2, np.float32)}, data_position=step, eval_accuracy=acc)
    assert ck.all_steps() == [2, 4, 5]
    assert ck.best_step() == 2
    ck.close()


def test_config_typos_and_bad_values_are_rejected():
    c = default_config()
    with pytest.raises(AttributeError, match="lr_rate.*lr"):
        c.optimizer.lr_rate = 1e-3
    with pytest.raises(AttributeError, match="total_steps"):
        c.totl_steps = 10
    c = smoke_config(parallel="pmapp")
    with pytest.raises(ValueError, match="parallel.*'jit', 'pmap'"):
        loop.validate_config(c)
    with pytest.raises(AttributeError, match="targets"):  # method blocks list their hyper-parameters
        smoke_config(**{"method.rnak": 4})
    c = smoke_config()
    c.method = ml_collections.ConfigDict({"name": "bitfit", "rnak": 4})  # a free-form method block
    with pytest.raises(TypeError, match="valid options"):
        model_setup.build_method(c)
    # Command line: the first unknown override is reported with the valid keys at its level.
    from jax_peft.main import _unknown_override

    smoke_file = str(ROOT / "jax_peft" / "configs" / "smoke.py")
    msg = _unknown_override([f"--config={smoke_file}:lora", "--config.method.rank=4", "--config.optimizer.lr_rate=1"])
    assert "config.optimizer has no 'lr_rate'" in msg and "grad_clip_norm, lr, momentum" in msg
    assert "rank" in _unknown_override(["--config", f"{smoke_file}:lora", "--config.method.rnak=4"])
    assert _unknown_override([f"--config={smoke_file}:lora", "--config.method.rank=4", "--config.total_steps=9"]) is None


def test_export_writes_a_merged_google_npz(straight, tmp_path):
    workdir, _ = straight
    config = smoke_config()
    path = loop.export(config, workdir, str(tmp_path / "merged.npz"))
    merged = jax_peft.load_checkpoint(path)
    s = loop.setup(config)
    _, state = _final_trainable(workdir)
    eff = s.method.apply(loop.step_lib.join_params(s.frozen, state["trainable"]), state["trainable"]["adapter"])
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    model = jax_peft.ViT(s.vit_config)
    want = model.apply({"params": eff}, x)
    got = model.apply({"params": merged}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert "pre_logits" not in merged and merged["head"]["kernel"].shape == (32, 4)


def test_sigterm_before_the_first_step_returns_cleanly(tmp_path):
    """A SIGTERM recorded by an earlier handler (the CLI's, during imports) stops the run before step 1."""

    class Early:
        requested = True

        def __call__(self, *args):
            pass

    previous = signal.signal(signal.SIGTERM, Early())
    try:
        out = loop.train_and_evaluate(smoke_config(), str(tmp_path))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert out == {"preempted": True, "step": 0}
    assert not (tmp_path / "summary.json").exists()


def test_fine_tunes_from_a_google_npz(straight, tmp_path):
    """model.checkpoint = a .npz path (here the merged export of the smoke run): the base comes from
    the file (architecture inferred), the head is new for the dataset's classes."""
    workdir, _ = straight
    npz = loop.export(smoke_config(), workdir, str(tmp_path / "base.npz"))
    base = jax_peft.load_checkpoint(npz)
    config = smoke_config(**{"model.checkpoint": npz, "model.hidden_size": -1, "model.num_layers": -1,
                             "total_steps": 4, "eval_every": 0, "schedule.warmup_steps": 1})
    s = loop.setup(config)
    flat, want = paths.flatten(s.params), paths.flatten(base)
    assert set(flat) == set(want)
    for p in flat:
        if not p.startswith("head/"):
            np.testing.assert_array_equal(flat[p], want[p])
    assert np.any(base["head"]["kernel"] != 0)  # the trained head in the file ...
    np.testing.assert_array_equal(s.params["head"]["kernel"], 0.0)  # ... is replaced (BitFit: zeros init)
    summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["steps"] == 4 and summary["final_eval_accuracy"] is not None


@pytest.fixture(scope="module")
def two_block_npz(tmp_path_factory):
    """A random 2-block smoke-sized ViT for 16x16 images as a Google .npz (written from numpy, so the
    runs below load it instead of compiling a random initialization)."""
    from conftest import random_params, tiny_vit_config

    path = tmp_path_factory.mktemp("two_block") / "vit.npz"
    return str(jax_peft.save_checkpoint(path, random_params(tiny_vit_config(num_layers=2, image_size=16), 0)))


# FacT-TT trains in activation form; RLRR's weight form on a scanned model is also checked by
# tests/test_scan.py (forward), so its training run here is `pytest -m extended`.
@pytest.mark.parametrize("method", ["fact_tt", pytest.param("rlrr", marks=pytest.mark.extended)])
def test_scanned_model_trains_like_the_unrolled_one(method, two_block_npz, tmp_path):
    """model.scan=True (one lax.scan over the blocks, frozen tree stacked once on the device) gives
    the unrolled run's losses and exports a canonical merged checkpoint."""
    runs = {}
    for scanned in (False, True):
        # 2 blocks (a scan needs more than one), 16x16 images (5 tokens), batch 8, 3 steps
        config = smoke_config(**{"model.scan": scanned, "model.checkpoint": two_block_npz, "model.hidden_size": -1,
                                 "model.num_layers": -1, "model.image_size": 16, "data.image_size": 16,
                                 "batch_size": 8, "total_steps": 3, "eval_every": 0,
                                 "schedule.warmup_steps": 1})
        config.method = method_config(method)
        if method == "fact_tt":
            config.method.dropout = 0.0  # the scanned model draws other dropout keys per block
        workdir = str(tmp_path / f"scan_{scanned}")
        loop.train_and_evaluate(config, workdir)
        losses = [r["loss"] for r in _records(workdir) if "loss" in r]
        merged = jax_peft.load_checkpoint(loop.export(config, workdir, str(tmp_path / f"{scanned}.npz")))
        runs[scanned] = losses, merged
    (l0, m0), (l1, m1) = runs[False], runs[True]
    assert len(l0) == 3
    # the same losses at every step (adapter values are not compared: Adam turns float-noise-level
    # differences in near-zero gradients into full-size steps)
    np.testing.assert_allclose(l1, l0, rtol=2e-5)
    assert set(paths.flatten(m1)) == set(paths.flatten(m0))  # canonical encoderblock_{i} layout
    assert "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel" in paths.flatten(m1)
