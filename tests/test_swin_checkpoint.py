"""Swin checkpoint files through load_checkpoint / save_checkpoint (no torch, no compilation):
Microsoft's .pth (weights under "model", buffers included), timm's .safetensors / .pth, refusal of
pickled code, short names and download checks."""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest
from conftest import DATA

import jax_peft
from jax_peft import download, paths, torch_io


def _microsoft_state_dict() -> dict[str, np.ndarray]:
    z = np.load(DATA / "swin" / "plain.npz")
    sd = {k[len("backbone/"):]: z[k] for k in z.files if k.startswith("backbone/")}
    sd["head.weight"], sd["head.bias"] = z["head/weight"], z["head/bias"]
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in sd.items()}


def _assert_same(a, b):
    fa, fb = paths.flatten(a), paths.flatten(b)
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_microsoft_pth_loads_without_torch(tmp_path):
    sd = _microsoft_state_dict()
    path = tmp_path / "swin_tiny_test.pth"
    torch_io.save_pth(path, {"model": sd})  # what Microsoft's training script saves (buffers included)
    params = jax_peft.load_checkpoint(path)
    _assert_same(params, jax_peft.swin.from_state_dict(sd))
    cfg = jax_peft.swin_config(params, image_size=32, num_classes=4)
    adapted = jax_peft.load_checkpoint(path, config=cfg)  # new head (zeros), tables kept
    assert adapted["head"]["kernel"].shape == (64, 4) and not adapted["head"]["kernel"].any()
    with pytest.raises(TypeError, match="SwinConfig"):
        jax_peft.load_checkpoint(path, config=jax_peft.vit_config("ViT-B/16"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_checkpoint_round_trips_a_swin_tree(tmp_path, suffix):
    params = jax_peft.swin.from_state_dict(_microsoft_state_dict())
    # a merged RLRR Swin has a bias beside the merging reduction: it round-trips and validates too
    params["layers_0"]["downsample"]["reduction"]["bias"] = np.linspace(-1, 1, 64, dtype=np.float32)
    path = jax_peft.save_checkpoint(tmp_path / f"merged{suffix}", params)
    raw = torch_io.read_state_dict(path)
    assert "head.fc.weight" in raw and "layers.1.downsample.reduction.weight" in raw  # timm's layout
    _assert_same(jax_peft.load_checkpoint(path), params)
    cfg = jax_peft.swin_config(params, image_size=32)
    _assert_same(jax_peft.load_checkpoint(path, config=cfg), params)
    with pytest.raises(ValueError, match=".safetensors or .pth"):
        jax_peft.save_checkpoint(tmp_path / "merged.npz", params)


class _Payload:
    def __reduce__(self):
        return (exec, ("open('pwned', 'w').close()",))


def test_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"model": {"x": _Payload()}}, protocol=2))
        z.writestr("archive/version", "3\n")
    with pytest.raises(ValueError, match="exec"):
        jax_peft.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_a_torch_file_that_is_not_a_swin_is_named(tmp_path):
    path = tmp_path / "vit.safetensors"
    torch_io.save_safetensors(path, {"blocks.0.attn.qkv.weight": np.zeros((6, 2), np.float32)})
    with pytest.raises(ValueError, match="neither a timm ViT state dict .* nor a Swin Transformer one"):
        jax_peft.load_checkpoint(path)


def test_swin_short_names_and_safetensors_download_check(tmp_path):
    url = download.resolve("swin_base_patch4_window7_224_22k.pth")[1]
    assert url == "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/" \
                  "swin_base_patch4_window7_224_22k.pth"
    assert download.resolve("swin_large_patch4_window12_384_22k")[1].endswith("window12_384_22k.pth")
    assert download.resolve("timm/swin_base_patch4_window7_224.ms_in22k")[1] == (
        "https://huggingface.co/timm/swin_base_patch4_window7_224.ms_in22k/resolve/main/model.safetensors")
    with pytest.raises(FileNotFoundError):
        download.resolve(str(tmp_path / "missing.pth"))
    good = tmp_path / "model.safetensors"
    torch_io.save_safetensors(good, {"a": np.zeros(3, np.float32)})
    download.check_file(good, "test file")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:20])
    with pytest.raises(ValueError, match="truncated"):
        download.check_file(cut, "test file")
