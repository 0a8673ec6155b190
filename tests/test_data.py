"""jax_peft.data: VTAB-1k under tfds.testing.mock_data, task semantics, batching, sharding, resume.

`tfds.testing.mock_data` patches `tfds.data_source` (the reader make_dataset uses), so the real TFDS
code path runs on generated records. Under the mock every split has `num_examples` records whatever
its slice, so split sizes are checked through `dataset_info` and the split strings.
"""

import contextlib
from unittest import mock

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

import jax_peft.data as D  # noqa: E402
from jax_peft.data import pipeline, preprocess, vtab  # noqa: E402

KW = dict(process_index=0, process_count=1)


class IndexSource:
    """Record i: a constant image of value i % 251 (size varies with i) and label i."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        h = 8 + i % 5
        return {"image": np.full((h, 10, 3), i % 251, np.uint8), "label": i}


def _index_of(batch):
    return batch["label"].tolist()


# --- the 19 tasks under the TFDS mock -----------------------------------------------------------------
def test_vtab_tasks_order_and_classes():
    tasks = D.vtab_tasks()
    assert tasks[:3] == ["vtab/caltech101", "vtab/cifar100", "vtab/dtd"]
    assert len(tasks) == 19 and tasks[-1] == "vtab/smallnorb_ele"
    assert sum(D.num_classes(t) for t in tasks) == 940
    assert D.num_classes("vtab/clevr_count") == 8 and D.num_classes("vtab/smallnorb_ele") == 9
    assert D.num_classes("vtab/sun397") == 397 and D.num_classes("vtab/caltech101") == 102


@pytest.mark.parametrize("task", vtab.TASKS)
def test_every_task_under_mock(task):
    name = f"vtab/{task}"
    with vtab_mock_data(num_examples=7):
        it = D.make_dataset(name, "train800val200", batch_size=3, image_size=16, train=True,
                            seed=1, prefetch=1, **KW)
        train = [next(it) for _ in range(3)]  # crosses an epoch boundary (2 batches/epoch)
        it.close()
        test = list(D.make_dataset(name, "test", batch_size=4, image_size=16, train=False, **KW))
    c = D.num_classes(name)
    for b in train:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (3, 16, 16, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (3,) and b["label"].dtype == np.int32
        assert b["label"].min() >= 0 and b["label"].max() < c
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert len(test) == 2
    assert [b["mask"].tolist() for b in test] == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert all(b["image"].shape == (4, 16, 16, 3) and b["label"].dtype == np.int32 for b in test)
    assert np.all(test[1]["image"][3] == 0)


@pytest.mark.parametrize("task", vtab.TASKS)
def test_every_task_is_deterministic_sharded_and_resumable_under_mock(task):
    name, kw = f"vtab/{task}", dict(image_size=8, train=True, seed=5, hflip=True, prefetch=0)
    with vtab_mock_data(num_examples=12):
        take = lambda it, n: [next(it) for _ in range(n)]  # noqa: E731
        ref = take(D.make_dataset(name, "train800val200", batch_size=4, **kw, **KW), 6)  # 2 epochs
        again = take(D.make_dataset(name, "train800val200", batch_size=4, **kw, **KW), 6)
        resumed = take(D.make_dataset(name, "train800val200", batch_size=4, start_batch=4, **kw, **KW), 2)
        hosts = [take(D.make_dataset(name, "train800val200", batch_size=2, process_index=p,
                                     process_count=2, **kw), 6) for p in range(2)]
    for a, b in zip(ref, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    for a, b in zip(ref[4:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
    for j, g in enumerate(ref):  # host slices concatenate to the single-host global batch
        np.testing.assert_array_equal(np.concatenate([hosts[0][j]["image"], hosts[1][j]["image"]]), g["image"])
        np.testing.assert_array_equal(np.concatenate([hosts[0][j]["label"], hosts[1][j]["label"]]), g["label"])


@contextlib.contextmanager
def vtab_mock_data(num_examples: int):
    """`tfds.testing.mock_data` whose variable-length features (images of unknown size, CLEVR's and
    KITTI's object lists) have 10 entries. The mock's random lengths (5..49) would make CLEVR scenes of
    up to 49 objects, whose count label (objects - 3) is outside clevr_count's 8 classes; real scenes
    hold 3..10 objects."""
    from tensorflow_datasets.testing import mocking

    init = mocking.RandomFakeGenerator.__init__

    def constant_lengths(self, *args, **kwargs):
        init(self, *args, **dict(kwargs, constant_dynamic_shape=True))

    with mock.patch.object(mocking.RandomFakeGenerator, "__init__", constant_lengths), \
            tfds.testing.mock_data(num_examples=num_examples):
        yield


def test_a_tfds_label_outside_the_task_classes_names_the_dataset_split_record_label_and_fix():
    with tfds.testing.mock_data(num_examples=7):  # random object counts: clevr_count labels up to 46
        src = vtab.get_source("vtab/clevr_count", "train800")
        with pytest.raises(pipeline.ExampleError, match=r"^vtab/clevr_count split 'train800', example \d \(TFDS "
                           r"clevr:3\.\*\.\* 'train\[:800\]', record \d\): label \d+ is outside \[0, 8\) "
                           r".*prepare it again \(python -m jax_peft.data.prepare vtab/clevr_count\)$"):
            [src[i] for i in range(7)]
        it = D.make_dataset("vtab/clevr_count", "train800", batch_size=7, image_size=8, train=False, **KW)
        with pytest.raises(pipeline.ExampleError, match="^vtab/clevr_count split 'train800', example .*label"):
            next(it)  # the same error through the pipeline (not wrapped again)


def test_configured_split_sizes_and_strings():
    for t in D.vtab_tasks():
        assert D.dataset_info(t, "train800")["num_examples"] == 800
        assert D.dataset_info(t, "val200")["num_examples"] == 200
        assert D.dataset_info(t, "train800val200") == {"num_examples": 1000,
                                                         "num_classes": D.num_classes(t)}
    tests = {"cifar100": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149,
             "oxford_iiit_pet": 3669, "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768,
             "eurosat": 5400, "resisc45": 6300, "diabetic_retinopathy": 42670, "clevr_count": 15000,
             "clevr_dist": 15000, "dmlab": 22735, "kitti": 711, "dsprites_loc": 73728,
             "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150}
    for t, n in tests.items():
        assert D.dataset_info(f"vtab/{t}", "test")["num_examples"] == n, t
    s = vtab.get_task("cifar100").splits
    assert s["train800val200"] == "train[:800]+train[45000:45200]" and s["test"] == "test"
    s = vtab.get_task("eurosat").splits
    assert s["val200"] == "train[16200:16400]" and s["test"] == "train[21600:]"
    assert vtab.get_task("eurosat").builder == "eurosat/rgb:2.*.*"
    s = vtab.get_task("smallnorb_ele").splits
    assert s["train800val200"] == "train[:800]+test[:200]" and s["test"] == "test[50%:]"
    assert vtab.get_task("clevr_dist").splits["test"] == "validation"
    assert vtab.get_task("caltech101").splits["val200"] == "train[2754:2954]"
    assert vtab.get_task("dsprites_loc").splits["val200"] == "train[589824:590024]"
    assert vtab.get_task("diabetic_retinopathy").builder.startswith(
        "diabetic_retinopathy_detection/btgraham-300:")
    assert vtab.get_task("cifar").name == "cifar100"  # export directory names are accepted


def test_label_functions_and_image_fixes():
    t = vtab.get_task
    obj = lambda n: {"size": np.zeros(n)}  # noqa: E731
    assert t("clevr_count").label_fn({"objects": obj(3)}) == 0
    assert t("clevr_count").label_fn({"objects": obj(10)}) == 7
    depth = lambda *z: {"objects": {"pixel_coords": np.array([[0, 0, v] for v in z])}}  # noqa: E731
    dist = t("clevr_dist").label_fn
    assert [dist(depth(v)) for v in (7.9, 8.0, 8.2, 8.7, 9.2, 9.7, 12.0)] == [0, 0, 1, 2, 3, 4, 5]
    assert dist(depth(12.0, 8.4)) == 1  # closest object counts
    kitti = t("kitti").label_fn
    car = lambda typ, z: {"objects": {"type": np.array(typ), "location": np.array([[0, 0, v] for v in z])}}  # noqa: E731
    assert kitti(car([0], [5.0])) == 0 and kitti(car([1], [8.0])) == 0
    assert kitti(car([2], [15.0])) == 1 and kitti(car([0], [30.0])) == 2
    assert kitti(car([3, 4], [2.0, 3.0])) == 3  # pedestrians etc. are not vehicles: no vehicle
    assert kitti(car([4, 0], [2.0, 25.0])) == 2
    loc, ori = t("dsprites_loc").label_fn, t("dsprites_ori").label_fn
    assert [loc({"label_x_position": v}) for v in (0, 1, 2, 31)] == [0, 0, 1, 15]
    assert [ori({"label_orientation": v}) for v in (0, 2, 3, 5, 39)] == [0, 0, 1, 2, 15]
    assert t("smallnorb_azi").label_fn({"label_azimuth": 17}) == 17
    assert t("smallnorb_ele").label_fn({"label_elevation": 8}) == 8
    img = t("dsprites_loc").image_fix(np.array([[[0], [1]]], np.uint8))
    assert img.shape == (1, 2, 3) and img.dtype == np.uint8 and img[0, 1].tolist() == [255] * 3
    assert t("smallnorb_azi").image_fix(np.ones((4, 4, 1), np.uint8)).shape == (4, 4, 3)


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="vtab/caltech101"):
        D.make_dataset("vtab/cifar10", "test", batch_size=2, image_size=8, train=False, **KW)
    with pytest.raises(ValueError, match="valid families"):
        D.num_classes("imagenet/foo")
    with pytest.raises(ValueError, match="train800val200"):
        D.dataset_info("vtab/dtd", "train1000")
    with pytest.raises(D.DatasetUnavailableError, match="jax_peft.data.prepare vtab/dtd"):
        D.make_dataset("vtab/dtd", "test", batch_size=2, image_size=8, train=False,
                       data_dir=str(tmp_path), **KW)
    with pytest.raises(D.DatasetUnavailableError, match="manual"):
        D.get_source("vtab/resisc45", "test", data_dir=str(tmp_path))


# --- batching, sharding, resume --------------------------------------------------------------------------
def _train(n=23, **kw):
    args = dict(batch_size=4, image_size=8, train=True, seed=3, source=IndexSource(n), **KW)
    args.update(kw)
    return D.make_dataset("folder/x", "train", **args)


# The documented training order: epoch e of seed s is np.random.default_rng([s, e]).permutation(N).
# Pinned values (N = 23): a change of the seeding rule changes every run's data order.
EPOCH_ORDER = {(3, 0): [9, 17, 12, 18, 0, 15, 3, 20, 8, 13, 6, 1, 10, 2, 11, 22, 16, 14, 4, 7, 5, 21, 19],
               (3, 1): [13, 10, 11, 2, 20, 14, 9, 5, 7, 6, 16, 12, 4, 22, 0, 3, 18, 17, 1, 15, 21, 8, 19],
               (4, 0): [19, 13, 16, 0, 7, 17, 9, 8, 5, 10, 20, 1, 18, 2, 11, 15, 6, 22, 4, 3, 12, 21, 14]}


def test_epoch_order_is_the_documented_function_of_seed_and_epoch():
    for (seed, epoch), order in EPOCH_ORDER.items():
        assert pipeline.epoch_permutation(23, seed, epoch).tolist() == order
    it = _train()
    assert it.steps_per_epoch == 5  # 23 // 4, remainder dropped
    batches = [next(it) for _ in range(10)]
    it.close()
    for e in range(2):
        seen = sum((_index_of(b) for b in batches[5 * e:5 * e + 5]), [])
        assert seen == EPOCH_ORDER[(3, e)][:20]  # the first 5 batches of 4 of each epoch's order
    other_seed = _train(seed=4)
    assert sum((_index_of(next(other_seed)) for _ in range(5)), []) == EPOCH_ORDER[(4, 0)][:20]
    other_seed.close()


def test_example_rng_is_the_documented_list_seeded_stream():
    # the uint32-array fast path must give default_rng([seed, epoch, index, 1])'s numbers, and
    # values outside uint32 fall back to the list
    for seed, epoch, index in [(0, 0, 0), (3, 7, 22), (2**32 - 1, 1, 5), (2**32, 0, 1), (5, 2**40, 9)]:
        got = pipeline.example_rng(seed, epoch, index).random(4)
        assert got.tolist() == np.random.default_rng([seed, epoch, index, 1]).random(4).tolist()


def test_epochs_are_permutations_and_deterministic():
    it = _train()
    batches = [next(it) for _ in range(10)]
    it.close()
    for e in range(2):
        seen = sum((_index_of(b) for b in batches[5 * e:5 * e + 5]), [])
        assert len(set(seen)) == 20 and set(seen) <= set(range(23))
    assert _index_of(batches[0]) != _index_of(batches[5])
    again = _train(prefetch=0)
    for b in batches:
        c = next(again)
        np.testing.assert_array_equal(b["image"], c["image"])
        np.testing.assert_array_equal(b["label"], c["label"])
    assert _index_of(next(_train(seed=4))) != _index_of(batches[0])


def test_resume_at_start_batch_is_exact():
    kw = dict(hflip=True, random_resized_crop=True, image_size=6)
    full = _train(**kw)
    ref = [next(full) for _ in range(12)]
    full.close()
    resumed = _train(start_batch=7, **kw)
    assert resumed.next_batch == 7
    for b in ref[7:]:
        c = next(resumed)
        np.testing.assert_array_equal(b["image"], c["image"])
        np.testing.assert_array_equal(b["label"], c["label"])
    resumed.close()


def test_hosts_take_disjoint_slices_of_each_global_batch():
    single = _train(batch_size=6)
    hosts = [_train(batch_size=3, process_index=p, process_count=2) for p in range(2)]
    for _ in range(7):  # 3 steps per epoch, crosses epoch boundaries
        g = _index_of(next(single))
        parts = [_index_of(next(h)) for h in hosts]
        assert parts[0] + parts[1] == g and not set(parts[0]) & set(parts[1])


def test_train_without_drop_remainder_keeps_last_partial_batch():
    it = _train(n=10, drop_remainder=False)
    batches = [next(it) for _ in range(6)]
    # static shapes: the epoch's last batch is padded to 4 and masked (2 real examples)
    assert [len(b["label"]) for b in batches] == [4] * 6
    assert [int(b["mask"].sum()) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert not batches[2]["image"][2:].any() and batches[2]["mask"][:2].all()
    with pytest.raises(ValueError, match="drop_remainder=True"):
        _train(n=11, batch_size=3, drop_remainder=False, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _train(n=3)


def test_normalize_false_gives_the_same_batches_as_uint8():
    """The training loop's form (normalized on the device): uint8 images, zero in padded slots, which
    `Preprocess.normalize` turns into the float32 batches bit for bit."""
    ev = dict(batch_size=4, image_size=8, train=False, source=IndexSource(10), normalization="imagenet", **KW)
    for floats, uint8 in [(_train(n=10, drop_remainder=False, hflip=True, normalization="imagenet"),
                           _train(n=10, drop_remainder=False, hflip=True, normalization="imagenet",
                                  normalize=False)),
                          (D.make_dataset("folder/x", "test", **ev), D.make_dataset("folder/x", "test",
                                                                                  normalize=False, **ev))]:
        for _ in range(3):  # the third batch is padded in both
            f, u = next(floats), next(uint8)
            assert u["image"].dtype == np.uint8 and set(f) == set(u) == {"image", "label", "mask"}
            real = f["mask"] > 0
            np.testing.assert_array_equal(preprocess.normalize(u["image"][real], "imagenet"), f["image"][real])
            assert not u["image"][~real].any() and not f["image"][~real].any()
            np.testing.assert_array_equal(f["label"], u["label"])
        floats.close()
        uint8.close()


def test_eval_pass_covers_every_record_once_across_hosts():
    n = 11
    per_host = []
    for p in range(3):
        it = D.make_dataset("folder/x", "test", batch_size=2, image_size=8, train=False,
                            source=IndexSource(n), process_index=p, process_count=3)
        per_host.append(list(it))
        assert it.num_batches == 2
    real = []
    for batches in per_host:
        for b in batches:
            assert b["image"].shape == (2, 8, 8, 3) and b["mask"].dtype == np.float32
            real += [int(lab) for lab, m in zip(b["label"], b["mask"]) if m]
            pad = b["mask"] == 0
            assert np.all(b["image"][pad] == 0)
    assert sorted(real) == list(range(n))
    # stored order: host 0 holds records 0, 1 then 6, 7
    assert [_index_of(b) for b in per_host[0]] == [[0, 1], [6, 7]]


def test_stats_and_preprocessing_values():
    it = _train(normalization="zero_one")
    b = next(it)
    assert it.stats["batches"] == 1 and it.stats["wait_s"] >= 0 and it.stats["load_s"] > 0
    np.testing.assert_allclose(b["image"][:, 0, 0, 0], (b["label"] % 251) / 255.0, rtol=1e-6)
    it.close()
    x = np.array([[[0, 128, 255]]], np.uint8)
    np.testing.assert_allclose(preprocess.normalize(x, "minus_one_one"), [[[-1, 128 / 127.5 - 1, 1]]], atol=1e-6)
    np.testing.assert_allclose(preprocess.normalize(x, "imagenet")[0, 0, 0], -0.485 / 0.229, rtol=1e-6)
    with pytest.raises(ValueError, match="imagenet"):
        preprocess.normalize(x, "0.5")


def test_preprocess_geometry():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
    from PIL import Image
    ref = np.asarray(Image.fromarray(img).resize((16, 16), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(preprocess.resize(img, 16, "bicubic"), ref)
    assert not np.array_equal(preprocess.resize(img, 16, "bilinear"), ref)
    for _ in range(20):
        top, left, h, w = preprocess.random_resized_crop_box(40, 30, rng)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 30
    p = preprocess.Preprocess(image_size=8, train=False, crop_fraction=0.5, normalization="zero_one")
    out = p(np.repeat(img[..., :1], 1, -1), None)  # grayscale in, RGB out
    assert out.shape == (8, 8, 3)
    big = preprocess.resize(preprocess.to_rgb(img[..., :1]), 16)
    np.testing.assert_allclose(out, big[4:12, 4:12] / 255.0, rtol=1e-6)
    flips = {bool(preprocess.Preprocess(8, True, hflip=True)(img, np.random.default_rng(s))[0, 0, 0]
                  != preprocess.Preprocess(8, False)(img, None)[0, 0, 0]) for s in range(8)}
    assert flips == {True, False}


def test_exhausted_eval_iterator_releases_its_threads():
    it = D.make_dataset("folder/x", "test", batch_size=4, image_size=8, train=False,
                        source=IndexSource(10), num_workers=2, **KW)
    assert len(list(it)) == 3
    assert not it._thread.is_alive() and it._pool._shutdown
    with pytest.raises(StopIteration):
        next(it)
