"""No silent wrong answer and no lost run (issue #15): resume with another config, unreadable
checkpoints, NaN, concurrent runs, labels, FGVC class ids, image sizes and input shapes, checkpoint
files, decode errors, workdir and dataset preparation problems. Each case ends with correct
behaviour or an error naming the problem and the fix."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_train_loop import _compilation_cache, smoke_config  # noqa: F401 (autouse fixture: shared XLA cache)

import jax_peft
from jax_peft import checkpoint as ck
from jax_peft.train import checkpointing, loop, model_setup, safety
from jax_peft.train import step as step_lib

ROOT = Path(__file__).resolve().parents[1]


def tiny_run_config(**overrides):
    """The smoke config cut to 3 steps of batch 8, one block, no warmup, checkpoint every step."""
    kw = {"total_steps": 3, "eval_every": 0, "checkpoint_every": 1, "batch_size": 8,
          "schedule.warmup_steps": 0, "data.prefetch": 0}
    kw.update(overrides)
    return smoke_config(**kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-step run (checkpoints 1, 2, 3)."""
    workdir = str(tmp_path_factory.mktemp("finished"))
    loop.train_and_evaluate(tiny_run_config(), workdir)
    return workdir


def _copy(workdir, tmp_path):
    dst = str(tmp_path / "w")
    shutil.copytree(workdir, dst)
    return dst


def _snapshot(workdir):
    return {f: open(os.path.join(workdir, f), "rb").read() for f in ("config.json", "metrics.jsonl")}


# ------------------------------------------------------------------------------- 1. resume config
def test_resume_with_a_changed_config_refuses_and_writes_nothing(finished, tmp_path):
    w = _copy(finished, tmp_path)
    before = _snapshot(w)
    c = tiny_run_config(total_steps=5, seed=7)
    c.model.patch_size = 4  # keeps every shape of the adapter: would resume silently before
    with pytest.raises(safety.IncompatibleCheckpointError) as e:
        loop.train_and_evaluate(c, w)
    msg = str(e.value)
    assert "model.patch_size: 8 -> 4" in msg and "seed: 0 -> 7" in msg and "total_steps: 3 -> 5" in msg
    assert "not corrupted" in msg and "new --workdir" in msg and "cannot change" in msg
    assert _snapshot(w) == before and sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["1", "2", "3"]
    assert not os.path.exists(os.path.join(w, safety.LOCK_NAME))  # released on the error
    # eval mode: refused too (the checkpoints are not set aside as corrupted)
    with pytest.raises(safety.IncompatibleCheckpointError, match="model.patch_size: 8 -> 4"):
        loop.evaluate(c, w)
    assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["1", "2", "3"]


def test_extending_a_run_needs_the_override_flag(finished, tmp_path):
    w = _copy(finished, tmp_path)
    with pytest.raises(safety.IncompatibleCheckpointError, match="--config.resume_override=total_steps"):
        loop.train_and_evaluate(tiny_run_config(total_steps=4), w)
    out = loop.train_and_evaluate(tiny_run_config(total_steps=4, resume_override="total_steps"), w)
    assert out["steps"] == 4
    assert [r["step"] for r in map(json.loads, open(os.path.join(w, "metrics.jsonl")))] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="seed.*cannot change when a run resumes"):
        safety.parse_override("total_steps,seed")


def test_config_differences_ignore_free_fields_and_fill_absent_keys_with_defaults():
    stored = {"seed": 0, "log_every": 1, "method": {"name": "lora", "rank": 8}}
    now = {"seed": 0, "log_every": 50, "progress": False, "method": {"name": "lora", "rank": 8, "alpha": 8.0}}
    diff = safety.config_differences(stored, now)
    assert "log_every" not in diff and "progress" not in diff
    assert ("method.alpha" in diff) == (jax_peft.get_method("lora").alpha != 8.0)
    now["method"]["rank"] = 4
    with pytest.raises(safety.IncompatibleCheckpointError, match="method.rank: 8 -> 4"):
        safety.check_resume_config(stored, now, step=5, where="DIR", override=[])


# ------------------------------------------------------------------ 7. the adapter's hyper-parameters
def _meta_files(workdir):
    return sorted(Path(workdir, "checkpoints").glob("*/meta/metadata"))


def test_checkpoints_record_the_adapter_spec_and_refuse_other_hyper_parameters(finished, tmp_path, monkeypatch):
    w = _copy(finished, tmp_path)
    trained = model_setup.build_method(tiny_run_config())
    metas = [json.loads(f.read_text()) for f in _meta_files(w)]
    assert len(metas) == 3 and all(m[checkpointing.SPEC_KEY]["hparams"] == trained.spec()["hparams"] for m in metas)
    assert metas[0][checkpointing.SPEC_KEY]["model"]["blocks"] == 1
    # the same config now builds another method (e.g. a changed default): eval and resume refuse,
    # naming the field, the stored and the requested value and the override that restores it
    other = jax_peft.get_method("bitfit", targets=r"^Transformer/.*bias$")
    monkeypatch.setattr(model_setup, "build_method", lambda config: other)
    want = (r"step 3 in .*bitfit: the adapter was built with other settings \(targets: stored '\^\(embedding.*', "
            r"requested '\^Transformer/\.\*bias\$'\).*--config.method.targets=.*new --workdir")
    with pytest.raises(safety.IncompatibleCheckpointError, match=want):
        loop.evaluate(tiny_run_config(), w)
    with pytest.raises(safety.IncompatibleCheckpointError, match=want):
        loop.train_and_evaluate(tiny_run_config(total_steps=4, resume_override="total_steps"), w)
    assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["1", "2", "3"]  # not taken for corrupted
    monkeypatch.undo()
    for f in _meta_files(w):  # a checkpoint written before specs were recorded: loads, unchecked
        meta = json.loads(f.read_text())
        del meta[checkpointing.SPEC_KEY]
        f.write_text(json.dumps(meta))
    assert loop.evaluate(tiny_run_config(), w)["step"] == 3


@pytest.mark.parametrize("name,stored,requested,flag", [
    ("lora", dict(alpha=16.0), dict(alpha=8.0), "--config.method.alpha=16.0"),
    ("rlrr", dict(init="official"), dict(init="identity"), "--config.method.init='official'"),
    ("fact_tt", dict(scale=10.0), dict(scale=1.0), "--config.method.scale=10.0"),
])
def test_a_stored_spec_refuses_a_restore_with_other_hyper_parameters(tmp_path, name, stored, requested, flag):
    built = jax_peft.get_method(name, **stored)
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ck"), spec=json.loads(json.dumps(built.spec())))
    ckpt.save({"step": np.int32(1), "w": np.ones(2, np.float32)}, data_position=1)
    abstract = jax.eval_shape(lambda: {"step": np.int32(0), "w": np.zeros(2, np.float32)})
    field = "init_scheme" if name == "rlrr" else next(iter(stored))
    check = lambda m, step: checkpointing.check_adapter_spec(m, jax_peft.get_method(name, **requested), where="CK")
    with pytest.raises(jax_peft.methods.base.SpecMismatchError,
                       match=rf"^CK: {name}: .*\({field}: stored {next(iter(stored.values()))!r}, requested "
                             rf"{next(iter(requested.values()))!r}\); use the method it was built for") as e:
        ckpt.restore(abstract, check_meta=check)
    assert e.value.fields == {field: (next(iter(stored.values())), next(iter(requested.values())))}
    assert ckpt.all_steps() == [1]  # incompatible is not corrupted
    same = lambda m, step: checkpointing.check_adapter_spec(m, jax_peft.get_method(name, **stored))
    assert int(ckpt.restore(abstract, check_meta=same)[0]["step"]) == 1
    # the training loop's check names the config override that brings the stored value back
    setup = type("S", (), {"method": jax_peft.get_method(name, **requested), "params": None})
    with pytest.raises(safety.IncompatibleCheckpointError, match=re.escape(flag)):
        loop._spec_check(setup, "DIR")(ckpt.read_meta(1), 1)
    ckpt.close()


# ---------------------------------------------------------------------------- 2. unreadable ckpts
def test_every_checkpoint_unreadable_is_moved_aside_and_a_step_is_never_skipped(tmp_path):
    d = tmp_path / "ck"
    ckpt = checkpointing.Checkpointer(str(d), keep=3)
    for s in (1, 2):
        ckpt.save({"step": np.int32(s), "w": np.full(4, s, np.float32)}, data_position=s)
    ckpt.close()
    for f in d.rglob("*"):
        if f.is_file() and "state" in f.parts:
            f.write_bytes(b"garbage")
    abstract = jax.eval_shape(lambda: {"step": np.int32(0), "w": np.zeros(4, np.float32)})
    ckpt = checkpointing.Checkpointer(str(d), keep=3)
    with pytest.warns(checkpointing.CheckpointCorruptedWarning, match="no readable checkpoint left"):
        assert ckpt.restore(abstract) is None
    assert ckpt.all_steps() == [] and {"corrupted_1", "corrupted_2"} <= set(os.listdir(d))
    state = {"step": np.int32(1), "w": np.zeros(4, np.float32)}
    loop._save(ckpt, state, 1, None, 0.0)  # the step can be written again
    with pytest.raises(RuntimeError, match="cannot save step 1.*already exists"):
        loop._save(ckpt, state, 1, None, 0.0)  # never a silent skip (the run would exit 0 unsaved)
    ckpt.close()


# ------------------------------------------------------------------------------------------ 3. NaN
def test_a_non_finite_state_is_never_saved(tmp_path, monkeypatch):
    real = model_setup.make_dataset

    def nan_from_batch_2(config, split, *, train, start_batch=0, **kwargs):
        # float32 batches (host-normalized, passed through by the steps) can carry a NaN; uint8 cannot
        it = real(config, split, train=train, start_batch=start_batch, **dict(kwargs, normalize=True))

        def gen():
            for k, b in enumerate(it, start_batch):
                if train and k >= 2:
                    b = dict(b, image=np.full_like(b["image"], np.nan))
                yield b
        return gen()

    monkeypatch.setattr(model_setup, "make_dataset", nan_from_batch_2)
    w = str(tmp_path / "w")
    # log_every > checkpoint_every: the loss is never logged before the saves
    with pytest.raises(FloatingPointError, match="non-finite.*at step 3.*last finite checkpoint is step 2"):
        loop.train_and_evaluate(tiny_run_config(total_steps=6, checkpoint_every=2, log_every=100), w)
    assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2"]


def test_step_flags_count_out_of_range_labels_and_non_finite_values():
    metrics = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(2.0)}
    f = step_lib.step_flags(metrics, {"w": jnp.ones(3)}, jnp.array([0, 4, -1, 9]), 4,
                            jnp.array([1.0, 1.0, 1.0, 0.0]))
    assert bool(f["finite"]) and int(f["bad_labels"]) == 2  # the padded slot (mask 0) does not count
    assert not bool(step_lib.step_flags(metrics, {"w": jnp.array([np.nan])}, jnp.array([0]), 4)["finite"])
    with pytest.raises(ValueError, match=r"labels outside \[0, 4\).*\[1\].*\[7\]"):
        step_lib.cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 7]))


# ----------------------------------------------------------------------------------------- 4. lock
def test_a_second_run_refuses_while_the_workdir_is_locked(tmp_path):
    w = str(tmp_path / "w")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(w)
        lock = {"host": socket.gethostname(), "pid": holder.pid, "start_time": safety._start_time(holder.pid),
                "since": "earlier"}
        Path(w, safety.LOCK_NAME).write_text(json.dumps(lock))
        with pytest.raises(safety.WorkdirLockedError, match=f"in use by pid {holder.pid}.*another --workdir"):
            loop.train_and_evaluate(tiny_run_config(), w)
        assert os.listdir(w) == [safety.LOCK_NAME]  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale, explained and taken over; released on exit.
    with pytest.warns(UserWarning, match=f"stale lock of pid {holder.pid}.*no longer running"):
        with safety.WorkdirLock(w) as taken:
            assert json.loads(Path(taken.path).read_text())["pid"] == os.getpid()
            with pytest.raises(safety.WorkdirLockedError, match="already in use by this process"):
                safety.WorkdirLock(w).acquire()
    assert os.listdir(w) == []
    # Another host's lock cannot be checked: refuse and say how to clear it.
    Path(w, safety.LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    with pytest.raises(safety.WorkdirLockedError, match="another host.*delete .*run.lock"):
        safety.WorkdirLock(w).acquire()


# ------------------------------------------------------------------------------------ workdir, CLI
def test_workdir_that_is_a_file_fails_in_one_line_before_any_work(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(safety.RunRefusedError, match="is a file, not a directory"):
        loop.train_and_evaluate(tiny_run_config(), str(f))
    with pytest.raises(safety.RunRefusedError, match="not writable"):
        loop.train_and_evaluate(tiny_run_config(), str(f / "sub"))
    (tmp_path / "eval_val.json").mkdir()  # the eval result could not be written: refused before evaluating
    with pytest.raises(safety.RunRefusedError, match="eval_val.json"):
        loop.evaluate(tiny_run_config(), str(tmp_path))
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    smoke = ROOT / "jax_peft" / "configs" / "smoke.py"
    r = subprocess.run([sys.executable, "-m", "jax_peft.main", "--config", str(smoke), "--workdir", str(f)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: --workdir {f} is a file, not a directory; pass a directory path (it is created when missing)"]


# -------------------------------------------------------------------------------------- 5. labels
def _folder(root, lines, name="ds"):
    d = Path(root, name)
    (d / "img").mkdir(parents=True, exist_ok=True)
    for i in range(len(lines)):
        Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(d / "img" / f"{i}.png")
    (d / "train.txt").write_text("".join(f"img/{i}.png {lab}\n" for i, lab in enumerate(lines)))
    return d


def test_labels_out_of_range_name_the_dataset_the_label_and_the_example(tmp_path):
    _folder(tmp_path, [0, 1, -1, 1])
    kw = dict(batch_size=4, image_size=8, train=False, data_dir=str(tmp_path), prefetch=0,
              process_index=0, process_count=1)
    with pytest.raises(jax_peft.data.ExampleError,
                       match=r"folder/ds split 'train', example 2 \(.*img/2.png, entry 3 of .*train.txt\): label -1"):
        next(jax_peft.data.make_dataset("folder/ds", "train", **kw))
    _folder(tmp_path, [0, 1, 3, 1], name="ds3")
    with pytest.raises(jax_peft.data.ExampleError, match=r"example 2 .*label 3 is outside \[0, 2\)"):
        next(jax_peft.data.make_dataset("folder/ds3", "train", num_classes=2, **kw))
    with pytest.warns(UserWarning, match=r"labels run to 3, but no list file .* uses \[2\]"):
        assert jax_peft.data.num_classes("folder/ds3", data_dir=str(tmp_path)) == 4


def test_model_with_fewer_classes_than_the_dataset_is_refused():
    with pytest.raises(ValueError, match="num_classes=3, but synthetic/smoke has 4 classes"):
        loop.setup(tiny_run_config(**{"model.num_classes": 3}))


def test_a_truncated_image_names_the_file_the_dataset_and_the_index(tmp_path):
    d = _folder(tmp_path, [0, 1])
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "img" / "1.jpg")
    (d / "img" / "1.jpg").write_bytes((d / "img" / "1.jpg").read_bytes()[:200])
    (d / "train.txt").write_text("img/0.png 0\nimg/1.jpg 1\n")
    it = jax_peft.data.make_dataset("folder/ds", "train", batch_size=2, image_size=8, train=False,
                                    data_dir=str(tmp_path), prefetch=0, process_index=0, process_count=1)
    with pytest.raises(jax_peft.data.ExampleError, match=r"folder/ds split 'train', example 1: .*cannot decode "
                                                         r"image .*img/1.jpg"):
        next(it)


# ---------------------------------------------------------------------------------- 6. FGVC ids
def test_fgvc_class_ids_map_to_the_same_label_in_every_split(tmp_path):
    from jax_peft.data import fgvc

    d = tmp_path / "CUB_200_2011"
    splits = {"train": {"a/0.png": 1, "c/1.png": 9},            # class 5 missing from train
              "val": {"b/0.png": 5}, "test": {"a/t.png": 1, "b/t.png": 5, "c/t.png": 9}}
    for split, anno in splits.items():
        for rel in anno:
            (d / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "images" / rel)
        (d / f"{split}.json").write_text(json.dumps(anno))
    train = fgvc.get_source("fgvc/cub200", "train", data_dir=str(tmp_path))
    test = fgvc.get_source("fgvc/cub200", "test", data_dir=str(tmp_path))
    assert train.labels.tolist() == [0, 2] and test.labels.tolist() == [0, 1, 2]


# -------------------------------------------------------------------------- 8. image size, input
def test_image_size_not_divisible_by_the_patch_is_refused_with_the_nearest_sizes():
    with pytest.raises(ValueError, match="image_size 230 is not divisible by patch_size 16.*224 or 240"):
        jax_peft.vit_config("ViT-B/16", image_size=230)
    with pytest.raises(ValueError, match="dtype 'bf16'.*use dtype='bfloat16'"):
        jax_peft.vit_config("ViT-B/16", dtype="bf16")


@pytest.mark.parametrize("shape, fix", [((32, 32, 3), "add the batch axis"), ((2, 3, 32, 32), "NCHW"),
                                        ((2, 32, 32, 1), "1 channels"), ((2, 48, 48, 3), "resize the images")])
def test_model_input_shape_is_checked_at_the_entry(tiny_config, tiny_params, shape, fix):
    with pytest.raises(ValueError, match=rf"expected \(B, 32, 32, 3\).*image_size 32.*{fix}"):
        jax_peft.ViT(tiny_config).apply({"params": tiny_params}, jnp.zeros(shape))


# ----------------------------------------------------------------------------- checkpoint files
def test_checkpoint_file_problems_are_named(tiny_params, tmp_path):
    flat = ck.to_pre_linen(tiny_params)
    gap = {k: v for k, v in flat.items() if "encoderblock_0/" not in k}
    np.savez(tmp_path / "gap.npz", **gap)
    with pytest.raises(ck.CheckpointError, match=r"lacks Transformer/encoderblock_\{0\}"):
        jax_peft.load_checkpoint(str(tmp_path / "gap.npz"), progress=False)
    np.savez(tmp_path / "obj.npz", **flat, extra=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ck.CheckpointError, match="'extra' holds pickled Python objects, which are refused for safety"):
        jax_peft.load_checkpoint(str(tmp_path / "obj.npz"), progress=False)
    bad = dict(flat, cls=np.full_like(flat["cls"], np.inf), **{"embedding/bias": np.zeros(32, np.int32)})
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.warns(UserWarning, match="NaN/Inf values in 1 array.*cls"):
        p = jax_peft.load_checkpoint(str(tmp_path / "bad.npz"), progress=False, config=jax_peft.vit_config(
            tiny_params, num_classes=5), head="keep")
    assert p["embedding"]["bias"].dtype == np.float32
    with pytest.raises(ck.CheckpointError, match="NaN/Inf"):
        jax_peft.load_checkpoint(str(tmp_path / "bad.npz"), progress=False, on_nonfinite="raise")


# ------------------------------------------------------------------------------------- prepare
def test_prepare_fails_fast_without_its_module_or_the_network(monkeypatch, capsys):
    from jax_peft.data import prepare

    monkeypatch.setattr(prepare, "PREPARE_MODULES", ("jax_peft_no_such_module",))
    assert prepare.main(["vtab/dtd", "--data_dir", "/nonexistent"]) == 1
    assert "needs jax_peft_no_such_module, which is not installed: pip install" in capsys.readouterr().err
    with socket.socket() as s:  # a local port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(prepare, "NETWORK_PROBE", ("127.0.0.1", port))
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    assert "no network: cannot reach 127.0.0.1" in prepare.network_error(timeout=2)
