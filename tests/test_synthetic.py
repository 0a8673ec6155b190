"""Contract of jax_peft.data.synthetic: shapes, dtypes, labels, and its splits as record sources behind
the shared batching code (determinism, resume, shards, padding through `jax_peft.data.make_dataset`)."""

import itertools

import numpy as np
import pytest

from jax_peft import data
from jax_peft.data import synthetic as syn


def _take(it, n):
    return list(itertools.islice(it, n))


def _batches(name, split, **kw):
    """`data.make_dataset` on one process (no JAX needed), synchronous (prefetch 0)."""
    kw = {"process_index": 0, "process_count": 1, "prefetch": 0, "num_workers": 1, **kw}
    return data.make_dataset(name, split, **kw)


def test_info_and_generate_shapes():
    for name, spec in syn.TASKS.items():
        for split, size in zip(syn.SPLITS, spec.sizes):
            info = syn.dataset_info(f"synthetic/{name}", split)
            assert info == dict(num_examples=size, num_classes=spec.num_classes)
    x, y = syn.generate("synthetic/smoke", "val", 16)
    assert x.shape == (256, 16, 16, 3) and x.dtype == np.uint8
    assert y.shape == (256,) and y.dtype == np.int32
    assert set(np.unique(y)) == set(range(4))  # every class present
    assert x.std() > 10  # not a blank image


def test_deterministic_and_splits_differ():
    a, la = syn.generate("synthetic/smoke", "val", 16)
    syn.generate.cache_clear()
    b, lb = syn.generate("synthetic/smoke", "val", 16)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    t, _ = syn.generate("synthetic/smoke", "test", 16)
    assert not np.array_equal(a, t)
    # no held-out image repeats a validation image
    flat_v = {bytes(v) for v in a.reshape(len(a), -1)}
    assert not any(bytes(v) in flat_v for v in t.reshape(len(t), -1))


def test_label_rule_smoke_is_colour():
    """The smoke label is the object's colour: the most saturated pixels carry its palette hue."""
    x, y = syn.generate("synthetic/smoke", "val", 32)
    f = x.astype(np.float32)
    sat = f.max(-1) - f.min(-1)
    flat_idx = sat.reshape(len(x), -1).argmax(1)
    px = f.reshape(len(x), -1, 3)[np.arange(len(x)), flat_idx]
    px = px / np.linalg.norm(px, axis=1, keepdims=True)
    pal = syn.PALETTE[:4] / np.linalg.norm(syn.PALETTE[:4], axis=1, keepdims=True)
    assert (np.argmax(px @ pal.T, 1) == y).mean() > 0.95


def test_source_is_the_generated_split():
    src = data.get_source("synthetic/smoke", "val", image_size=16)
    x, y = syn.generate("synthetic/smoke", "val", 16)
    assert len(src) == 256
    assert np.array_equal(src[5]["image"], x[5]) and src[5]["label"] == y[5]
    with pytest.raises(ValueError, match="image_size"):
        data.get_source("synthetic/smoke", "val")


def test_train_batches_shapes_range_and_normalization():
    b = next(_batches("synthetic/smoke", "train", batch_size=8, image_size=16, train=True, seed=1))
    assert set(b) == {"image", "label"}
    assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["label"].min() >= 0 and b["label"].max() < 4
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    z = next(_batches("synthetic/smoke", "train", batch_size=8, image_size=16, train=True, seed=1,
                      normalization="zero_one"))
    np.testing.assert_allclose(z["image"] * 2 - 1, b["image"], atol=1e-6)


def test_train_epochs_are_permutations_and_seeded():
    kw = dict(batch_size=128, image_size=16, train=True)
    a = _take(_batches("synthetic/smoke", "train", seed=3, **kw), 8)  # one epoch of 1024
    c = _take(_batches("synthetic/smoke", "train", seed=4, **kw), 1)
    assert not np.array_equal(a[0]["label"], c[0]["label"])
    _, labels = syn.generate("synthetic/smoke", "train", 16)
    first = np.concatenate([x["label"] for x in a])
    np.testing.assert_array_equal(np.bincount(first, minlength=4), np.bincount(labels, minlength=4))
    e0 = np.concatenate([x["image"] for x in a]).reshape(1024, -1)
    assert len({bytes(r) for r in e0}) == 1024


def test_resume_at_start_batch_with_hflip():
    kw = dict(batch_size=96, image_size=16, train=True, seed=7, hflip=True)
    full = _take(_batches("synthetic/smoke", "train", **kw), 13)  # crosses the epoch boundary (10 per epoch)
    resumed = _take(_batches("synthetic/smoke", "train", start_batch=9, **kw), 4)
    for x, y in zip(full[9:], resumed):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_process_shards_are_disjoint_and_union_is_global_batch():
    kw = dict(image_size=16, train=True, seed=5, hflip=True)
    whole = _take(_batches("synthetic/smoke", "train", batch_size=48, **kw), 2)
    parts = [_take(_batches("synthetic/smoke", "train", batch_size=16, **{**kw, "process_index": p,
                                                                          "process_count": 3}), 2)
             for p in range(3)]
    for b in range(2):
        imgs = np.concatenate([parts[p][b]["image"] for p in range(3)])
        np.testing.assert_array_equal(imgs, whole[b]["image"])


def test_eval_one_pass_padded_with_mask():
    _, labels = syn.generate("synthetic/smoke", "val", 16)  # 256 examples
    batches = list(_batches("synthetic/smoke", "val", batch_size=100, image_size=16, train=False))
    assert len(batches) == 3
    for b in batches:
        assert b["image"].shape == (100, 16, 16, 3) and b["mask"].dtype == np.float32
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 256 and mask[:256].all() and not mask[256:].any()
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:256], labels)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="valid names"):
        syn.dataset_info("synthetic/nope", "train")
    with pytest.raises(ValueError, match="valid splits"):
        syn.dataset_info("synthetic/smoke", "train800val200")
    with pytest.raises(ValueError, match="hflip"):
        _batches("synthetic/downstream", "train", batch_size=4, image_size=16, train=True, hflip=True)
    with pytest.raises(ValueError, match="random_resized_crop"):
        _batches("synthetic/smoke", "train", batch_size=4, image_size=16, train=True, random_resized_crop=True)
    with pytest.raises(ValueError, match="normalization"):
        _batches("synthetic/smoke", "train", batch_size=4, image_size=16, train=True, normalization="x")
    assert data.dataset_info("synthetic/downstream", "test") == dict(num_examples=2000, num_classes=8)
    assert data.num_classes("synthetic/upstream") == 24
