"""Lazy `.npz` reading (jax_peft.lazy_npz): equal to np.load, slices read on demand, streamed placement,
clear errors for damaged files. The 8-device streamed fsdp placement runs in tests/test_fsdp.py's child."""

from __future__ import annotations

import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_peft
from jax_peft import lazy_npz, paths
from jax_peft.checkpoint import CheckpointError
from jax_peft.lazy_npz import LazyArray
from jax_peft.train import sharding


def _arrays() -> dict[str, np.ndarray]:
    r = np.random.default_rng(0)
    return {
        "f32": r.normal(size=(5, 7)).astype(np.float32),
        "f16_fortran": np.asfortranarray(r.normal(size=(6, 4, 3)).astype(np.float16)),
        "bf16_raw": r.normal(size=(3, 4)).astype(ml_dtypes.bfloat16).view("V2"),  # as big_vision stores it
        "f64": r.normal(size=(2, 3, 4)),
        "i32": np.arange(12, dtype=np.int32).reshape(3, 4),
        "scalar": np.float32(3.5),
        "empty": np.zeros((0, 3), np.float32),
    }


@pytest.fixture(params=["savez", "savez_compressed"])
def npz(request, tmp_path):
    path = tmp_path / "a.npz"
    getattr(np, request.param)(path, **_arrays())
    return request.param, path


def test_lazy_reader_equals_np_load(npz):
    kind, path = npz
    lazy = lazy_npz.open_npz(path)
    with np.load(path) as z:
        assert sorted(lazy) == sorted(z.files)
        for k in z.files:
            want = z[k].view(ml_dtypes.bfloat16) if z[k].dtype == np.dtype("V2") else z[k]
            got = np.asarray(lazy[k])
            assert (got.shape, got.dtype, got.tobytes("A")) == (want.shape, want.dtype, want.tobytes("A")), k
    # stored members are memory-mapped at their offset; compressed ones are read whole, one at a time
    assert all((m.offset is not None) == (kind == "savez") for m in lazy.members)
    assert [m.fortran for m in lazy.members if m.key == "f16_fortran"] == [True]
    assert lazy.verify() == []


def test_zip64_archives_are_mapped(tmp_path, monkeypatch):
    """np.savez writes every member with a zip64 local header (force_zip64); a file past 4 GiB or 65535
    members also has zip64 offsets in its central directory and a zip64 end record. Lowering zipfile's
    limits makes a tiny file with all of them."""
    path = tmp_path / "a.npz"
    with monkeypatch.context() as m:
        m.setattr(zipfile, "ZIP64_LIMIT", 64)
        m.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)
        np.savez(path, **_arrays())
    data = path.read_bytes()
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data  # zip64 end of central directory + locator
    with zipfile.ZipFile(path) as z:
        assert z.infolist()[2].extra[:2] == b"\x01\x00" and len(z.infolist()[2].extra) >= 28  # offset in zip64
    lazy = lazy_npz.open_npz(path)
    assert all(m.offset is not None for m in lazy.members)
    for k, v in _arrays().items():
        np.testing.assert_array_equal(np.asarray(lazy[k]).view(v.dtype), v, err_msg=k)
    assert lazy.verify() == []


@pytest.mark.parametrize("index", [(), (1,), (slice(1, 4), 2), (Ellipsis, slice(0, 2)), (-1, slice(None), 0),
                                   (slice(None, None, 2), slice(1, 3), slice(None))])
def test_slices_casts_blocks_and_stacks_read_only_what_is_asked(npz, index):
    _, path = npz
    full = _arrays()["f16_fortran"]
    x = lazy_npz.open_npz(path)["f16_fortran"]
    np.testing.assert_array_equal(x[index], full[index])
    cast = x.astype(np.float32)
    assert isinstance(cast, LazyArray) and cast[index].dtype == np.float32
    np.testing.assert_array_equal(cast[index], full[index].astype(np.float32))
    np.testing.assert_array_equal(x.take(-1)[index[1:]], full[-1][index[1:]])
    stacked = lazy_npz.stack([x.take(2), x.take(0), full[1]])
    np.testing.assert_array_equal(stacked[index], np.stack([full[2], full[0], full[1]])[index])
    np.testing.assert_array_equal(x[np.array([2, 0])], full[np.array([2, 0])])  # fancy: read, then index


def test_without_mmap_members_are_read_from_the_file(tmp_path, monkeypatch):
    path = tmp_path / "a.npz"
    np.savez(path, **_arrays())
    lazy = lazy_npz.open_npz(path)

    def no_mmap(*args, **kwargs):
        raise OSError("mmap is not supported here")

    monkeypatch.setattr(np, "memmap", no_mmap)
    full = _arrays()["f16_fortran"]
    np.testing.assert_array_equal(lazy["f16_fortran"][1:3, :, 2], full[1:3, :, 2])
    np.testing.assert_array_equal(np.asarray(lazy["f32"]), _arrays()["f32"])


def test_streamed_placement_reads_each_distinct_slice_once_and_equals_the_eager_load(tmp_path, tiny_params):
    calls = []
    full = np.arange(24, dtype=np.float32).reshape(4, 6)
    x = LazyArray(full.shape, np.float16, lambda idx: calls.append(idx) or full[idx])
    mesh = sharding.make_mesh(1, 1)
    y = lazy_npz.to_device(x, NamedSharding(mesh, P(None, "fsdp")))
    assert y.dtype == np.float16 and len(calls) == 1  # one device: one full-index read, cast on the fly
    np.testing.assert_array_equal(np.asarray(y), full.astype(np.float16))

    path = jax_peft.save_checkpoint(tmp_path / "vit.npz", tiny_params)
    eager = paths.flatten(jax_peft.load_checkpoint(path))
    for placed in (jax_peft.load_checkpoint(path, sharding=NamedSharding(mesh, P())),
                   sharding.load_sharded(str(path), mesh, min_bytes=0)):
        flat = paths.flatten(placed)
        assert sorted(flat) == sorted(eager) and all(isinstance(v, jax.Array) for v in flat.values())
        for k, v in flat.items():
            np.testing.assert_array_equal(np.asarray(v), eager[k], err_msg=k)


def test_damaged_files_give_errors_naming_the_file_and_the_fix(tmp_path, tiny_params):
    path = jax_peft.save_checkpoint(tmp_path / "t.npz", tiny_params)
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])  # no central directory
    with pytest.raises(CheckpointError, match=r"(?s)cut\.npz.*truncated.*download it again"):
        jax_peft.load_checkpoint(cut, lazy=True)

    member = lazy_npz.open_npz(path).members[3]  # its last bytes flipped: its CRC-32 fails in the verify pass
    member_end = member.offset + int(np.prod(member.shape)) * member.dtype.itemsize
    bad = bytearray(data)
    bad[member_end - 8: member_end] = b"\xff" * 8
    (tmp_path / "crc.npz").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match=rf"(?s)crc\.npz.*{member.info.filename}.*CRC-32.*download it again"):
        jax_peft.load_checkpoint(tmp_path / "crc.npz", lazy=True)

    short = tmp_path / "short.npz"  # a member whose header promises more bytes than the zip holds
    with zipfile.ZipFile(short, "w") as z:
        with z.open("a.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (100,)})
            f.write(b"\x00" * 40)
    with pytest.raises(CheckpointError, match=r"(?s)short\.npz.*'a\.npy' holds 40 array bytes.*says 400"):
        lazy_npz.open_npz(short)

    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CheckpointError, match=r"(?s)obj\.npz.*pickled Python objects.*numpy\.savez"):
        lazy_npz.open_npz(tmp_path / "obj.npz")


def test_non_finite_values_are_found_by_the_verify_pass(tmp_path, tiny_params):
    tiny_params["cls"][0, 0, 1] = np.nan
    path = jax_peft.save_checkpoint(tmp_path / "nan.npz", tiny_params)
    with pytest.warns(UserWarning, match=r"NaN/Inf values in 1 array\(s\): cls"):
        jax_peft.load_checkpoint(path, lazy=True)
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        jax_peft.load_checkpoint(path, lazy=True, on_nonfinite="raise")
