"""PyTorch weight files read and written without torch, and never running pickled code."""

import collections
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from jax_peft import torch_io


def _state_dict():
    rng = np.random.default_rng(0)
    return collections.OrderedDict(
        [
            ("layers.0.blocks.0.attn.qkv.weight", rng.normal(size=(12, 4)).astype(np.float32)),
            ("layers.0.blocks.0.attn.relative_position_index", np.arange(9, dtype=np.int64).reshape(3, 3)),
            ("norm.bias", rng.normal(size=(4,)).astype(np.float64)),
            ("half", rng.normal(size=(2, 3)).astype(np.float16)),
            ("bf16", rng.normal(size=(5,)).astype(ml_dtypes.bfloat16)),
            ("mask", np.array([True, False])),
            ("scalar", np.array(3.5, np.float32)),
            ("empty", np.zeros((0, 4), np.float32)),
        ]
    )


def test_pth_round_trip_with_training_checkpoint_wrapper(tmp_path):
    sd = _state_dict()
    path = tmp_path / "ckpt.pth"
    torch_io.save_pth(path, {"model": sd, "epoch": 30, "max_accuracy": 81.2, "tag": "x", "ok": True})
    loaded = torch_io.load_pth(path)
    assert loaded["epoch"] == 30 and loaded["max_accuracy"] == 81.2 and loaded["tag"] == "x"
    flat = torch_io.read_state_dict(path)
    assert list(flat) == list(sd)
    for name, value in sd.items():
        assert flat[name].dtype == value.dtype and flat[name].shape == value.shape
        np.testing.assert_array_equal(flat[name], value)


def test_strided_views_of_one_storage(tmp_path):
    # torch saves a transposed view as the shared storage plus strides; rebuild must honour them.
    storage = np.arange(12, dtype=np.float32)
    view = torch_io._rebuild_tensor(storage, 2, (2, 3), (1, 2))
    np.testing.assert_array_equal(view, storage[2:8].reshape(3, 2).T)
    with pytest.raises(torch_io.TorchFileError, match="reads past its storage"):
        torch_io._rebuild_tensor(storage, 10, (2, 3), (3, 1))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"model": {"w": _Exploit(marker)}}, protocol=2))
    with pytest.raises(torch_io.TorchFileError, match=r"posix\.system.*refused for safety"):
        torch_io.read_state_dict(path)
    assert not marker.exists()


def test_non_tensor_entries_and_legacy_files_are_explained(tmp_path):
    path = tmp_path / "mixed.pth"
    torch_io.save_pth(path, {"w": np.zeros(2, np.float32), "step": 3})
    with pytest.raises(torch_io.TorchFileError, match="'step' is a int, not a tensor"):
        torch_io.read_state_dict(path)
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
    with pytest.raises(torch_io.TorchFileError, match="not a zip-format PyTorch file"):
        torch_io.read_state_dict(legacy)


def test_truncated_storage_is_reported(tmp_path):
    path = tmp_path / "ok.pth"
    torch_io.save_pth(path, {"w": np.ones((4, 4), np.float32)})
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    entries["archive/data/0"] = entries["archive/data/0"][:10]
    cut = tmp_path / "cut.pth"
    with zipfile.ZipFile(cut, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    with pytest.raises(torch_io.TorchFileError, match="has 10 bytes"):
        torch_io.read_state_dict(cut)


def test_safetensors_round_trip(tmp_path):
    sd = dict(_state_dict())
    path = tmp_path / "w.safetensors"
    torch_io.save_safetensors(path, sd, metadata={"format": "pt"})
    flat = torch_io.read_state_dict(path)
    assert set(flat) == set(sd)
    for name, value in sd.items():
        assert flat[name].dtype == value.dtype
        np.testing.assert_array_equal(flat[name], value)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(torch_io.TorchFileError, match="not a readable .safetensors"):
        torch_io.read_state_dict(tmp_path / "bad.safetensors")
