"""The streamed merged export: `merge(..., lazy=True)` + `save_checkpoint` writes the same `.npz`
members as the eager merge, reading each frozen leaf once, only while the file is written."""

from __future__ import annotations

import zipfile

import jax
import numpy as np
import pytest

import jax_peft
from jax_peft import checkpoint as ckpt
from jax_peft import paths
from jax_peft.lazy_npz import LazyArray
from jax_peft.merge import merge


def _adapter(method, params):
    """A random adapter of method.init's shapes (traced, not compiled), far from the identity."""
    shapes = jax.eval_shape(lambda p: method.init(jax.random.PRNGKey(0), p), params)
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(lambda s: 0.1 * rng.standard_normal(s.shape).astype(np.float32), shapes)


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def _counting(params, reads):
    """`params` with LazyArray leaves that count their reads in `reads[path]`."""
    def lazy(path, x):
        def reader(idx):
            reads[path] = reads.get(path, 0) + 1
            return x[idx]
        return LazyArray(x.shape, x.dtype, reader, path)

    return paths.map_with_path(lazy, params)


@pytest.mark.parametrize("name,layout", [("rlrr", "vit_jax"), ("lora", "vit_jax"), ("fact_tt", "vit_jax"),
                                         ("ssf", "big_vision"), ("full", "vit_jax")])
def test_streamed_export_writes_the_eager_files_members(tmp_path, tiny_params, name, layout):
    method = jax_peft.get_method(name)
    adapter = _adapter(method, tiny_params)
    merged = paths.flatten(merge(tiny_params, method, adapter))
    eager = ckpt.save_checkpoint(tmp_path / "eager.npz", paths.unflatten(merged), layout=layout)
    base = ckpt.save_checkpoint(tmp_path / "base.npz", tiny_params)
    frozen = jax_peft.load_checkpoint(base, lazy=True)  # the training CLI's frozen tree
    lazy = merge(frozen, method, adapter, lazy=True)
    assert all(isinstance(x, LazyArray) for x in paths.flatten(lazy).values())
    streamed = ckpt.save_checkpoint(tmp_path / "streamed.npz", lazy, layout=layout)
    a, b = _members(eager), _members(streamed)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []  # each .npy member byte for byte (header, dtype, values)
    if layout == "vit_jax":
        for k, v in paths.flatten(jax_peft.load_checkpoint(streamed)).items():
            np.testing.assert_array_equal(v, np.asarray(merged[k]))


def test_each_frozen_leaf_is_read_once_and_only_while_writing(tmp_path, tiny_params):
    method = jax_peft.get_method("lora", rank=2, variant="fused_qkv")
    reads: dict[str, int] = {}
    lazy = merge(_counting(tiny_params, reads), method, _adapter(method, tiny_params), lazy=True)
    assert reads == {}  # nothing computed by merge itself
    ckpt.save_checkpoint(tmp_path / "m.npz", lazy)
    assert reads == {k: 1 for k in paths.flatten(tiny_params)}  # the qkv site's edit computes q, k, v at once: kept
    # zero-argument callables are leaves too (called when their member is written)
    thunks = paths.map_with_path(lambda p, x: (lambda: x), tiny_params)
    path = ckpt.save_checkpoint(tmp_path / "t.npz", thunks)
    assert _members(path) == _members(ckpt.save_checkpoint(tmp_path / "e.npz", tiny_params))


def test_a_leaf_that_cannot_be_computed_is_named_and_no_file_is_left(tmp_path, tiny_params):
    method = jax_peft.get_method("rlrr")
    adapter = _adapter(method, tiny_params)
    bad = "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"

    def fail(path, x):
        def reader(idx):
            raise OSError("disk gone")
        return LazyArray(x.shape, x.dtype, reader, path) if path == bad else x

    lazy = merge(paths.map_with_path(fail, tiny_params), method, adapter, lazy=True)
    with pytest.raises(ValueError, match=f"frozen leaf '{bad}'.*OSError: disk gone"):
        ckpt.save_checkpoint(tmp_path / "m.npz", lazy)
    thunks = {**tiny_params, "cls": lambda: 1 / 0}
    with pytest.raises(ValueError, match="leaf 'cls'.*ZeroDivisionError"):
        ckpt.save_checkpoint(tmp_path / "m.npz", thunks)
    assert list(tmp_path.iterdir()) == []  # atomic: neither the file nor a temporary one
