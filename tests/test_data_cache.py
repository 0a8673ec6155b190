"""jax_peft.data.cache (decoded cache) and worker processes: the same batches as decoding every epoch."""

import os

import numpy as np
import pytest
from PIL import Image

import jax_peft.data as D
from jax_peft.data import cache as C
from jax_peft.data import preprocess

KW = dict(process_index=0, process_count=1)


def _write_folder(root, n=13, name="ds"):
    """`root/name/{train,test}.txt` over n JPEGs of varying sizes (VTAB-export layout)."""
    d = os.path.join(root, name)
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        img = rng.integers(0, 256, (20 + 3 * (i % 4), 24 + 2 * (i % 3), 3), dtype=np.uint8)
        path = f"images/{i:03d}.jpg"
        Image.fromarray(img).save(os.path.join(d, path), quality=90)
        lines.append(f"{path} {i % 5}\n")
    for split in ("train", "test"):
        with open(os.path.join(d, f"{split}.txt"), "w") as f:
            f.writelines(lines)
    return d


def _batches(cache_dir, n_batches, *, data_dir, split="train", **kw):
    """(iterator, its first n_batches batches; all of them when n_batches is 0)."""
    args = dict(batch_size=4, image_size=8, seed=3, data_dir=data_dir, prefetch=0, worker_processes=0,
                cache_dir=str(cache_dir), **KW)
    args.update(kw)
    it = D.make_dataset("folder/ds", split, **args)
    out = [next(it) for _ in range(n_batches)] if n_batches else list(it)
    it.close()
    return it, out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("geometry", [dict(hflip=True), dict(hflip=True, crop_fraction=0.8),
                                      dict(normalization="imagenet", interpolation="bilinear")])
def test_cached_batches_are_bit_identical_and_resume_exactly(tmp_path, geometry):
    data = str(tmp_path / "data")
    _write_folder(data)
    cdir = tmp_path / "cache"
    _, plain = _batches(cdir, 7, data_dir=data, train=True, **geometry)  # 3 batches/epoch: 3 epochs
    it, cached = _batches(cdir, 7, data_dir=data, train=True, cache=True, **geometry)
    assert isinstance(it.source, C.DecodedCache)
    _assert_same(plain, cached)
    _, resumed = _batches(cdir, 2, data_dir=data, train=True, cache=True, start_batch=5, **geometry)
    _assert_same(cached[5:], resumed)
    _, plain_eval = _batches(cdir, 0, data_dir=data, train=False, split="test", **geometry)
    _, cached_eval = _batches(cdir, 0, data_dir=data, train=False, split="test", cache=True, **geometry)
    _assert_same(plain_eval, cached_eval)
    assert [b["mask"].sum() for b in cached_eval] == [4, 4, 4, 1]


def test_cache_key_rebuild_limits_and_what_is_not_cached(tmp_path):
    data = str(tmp_path / "data")
    d = _write_folder(data)
    cdir = tmp_path / "cache"
    it, _ = _batches(cdir, 1, data_dir=data, train=True, cache=True)
    first = it.source.directory
    assert os.path.basename(first).startswith("train_8px_bicubic_")
    assert it.source.images.shape == (13, 8, 8, 3) and it.source.images.dtype == np.uint8
    it, _ = _batches(cdir, 1, data_dir=data, train=True, cache=True)
    assert it.source.directory == first  # reused, not rebuilt
    img = np.full((30, 30, 3), 7, np.uint8)  # a changed image file changes the key
    Image.fromarray(img).save(os.path.join(d, "images/004.jpg"))
    it, batches = _batches(cdir, 4, data_dir=data, train=True, cache=True)
    assert it.source.directory != first and not os.path.exists(first)  # stale entry removed
    np.testing.assert_array_equal(it.source.images[4], preprocess.resize(np.asarray(Image.open(
        os.path.join(d, "images/004.jpg")).convert("RGB")), 8))
    assert sorted(os.listdir(cdir / "folder_ds")) == [os.path.basename(it.source.directory)]
    # not cached: random resized crops, a split over the size limit, a source without fingerprint
    it, _ = _batches(cdir, 1, data_dir=data, train=True, cache=True, random_resized_crop=True)
    assert not isinstance(it.source, C.DecodedCache)
    it, _ = _batches(cdir, 1, data_dir=data, train=True, cache=True, cache_max_gb=13 * 8 * 8 * 3 / 2**30 * 0.99)
    assert not isinstance(it.source, C.DecodedCache)
    assert C.source_fingerprint(object()) is None


def test_tfds_vtab_task_cached_under_mock(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    kw = dict(batch_size=4, image_size=8, seed=5, hflip=True, prefetch=0, worker_processes=0,
              cache_dir=str(tmp_path), **KW)
    with tfds.testing.mock_data(num_examples=12):
        for task in ("vtab/dsprites_loc", "vtab/cifar100"):
            plain = D.make_dataset(task, "train800val200", train=True, **kw)
            cached = D.make_dataset(task, "train800val200", train=True, cache=True, **kw)
            assert isinstance(cached.source, C.DecodedCache)
            _assert_same([next(plain) for _ in range(4)], [next(cached) for _ in range(4)])


def test_worker_processes_give_the_same_batches(tmp_path):
    data = str(tmp_path / "data")
    _write_folder(data, n=10)
    geometry = dict(hflip=True, crop_fraction=0.8, prefetch=2)
    _, threads = _batches(tmp_path / "c", 5, data_dir=data, train=True, **geometry)
    it, procs = _batches(tmp_path / "c", 5, data_dir=data, train=True,
                         **dict(geometry, worker_processes=2, normalize=False))  # the training loop's uint8
    assert it._procs is not None
    assert all(b["image"].dtype == np.uint8 for b in procs)
    _assert_same(threads, [dict(b, image=preprocess.normalize(b["image"])) for b in procs])
    # the cache built by two processes equals the one built here
    src = D.get_source("folder/ds", "train", data_dir=data)
    t = preprocess.Preprocess(image_size=8, train=True, hflip=True)
    a = C.open_cache(src, t, dataset="folder/ds", split="train", cache_dir=str(tmp_path / "one"))
    b = C.open_cache(src, t, dataset="folder/ds", split="train", cache_dir=str(tmp_path / "two"), workers=2)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
