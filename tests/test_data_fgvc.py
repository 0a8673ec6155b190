"""FGVC (VPT split files or TFDS) and few-shot (NOAH lists or seeded k-shot sampling from TFDS)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

import jax_peft.data as D  # noqa: E402
from jax_peft.data import fewshot  # noqa: E402

KW = dict(process_index=0, process_count=1)


def _img(path, value, size=(20, 14)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _vpt_cub(root):
    d = os.path.join(root, "CUB_200_2011")
    splits = {"train": {"001.a/x0.png": 1, "005.b/x1.png": 5, "009.c/x2.png": 9, "001.a/x3.png": 1},
              "val": {"005.b/v0.png": 5, "009.c/v1.png": 9},
              "test": {"001.a/t0.png": 1, "009.c/t1.png": 9, "005.b/t2.png": 5}}
    for split, anno in splits.items():
        for i, rel in enumerate(anno):
            _img(os.path.join(d, "images", rel), 10 * anno[rel] + i)
        with open(os.path.join(d, f"{split}.json"), "w") as f:
            json.dump(anno, f)
    return d


def test_fgvc_vpt_json_splits(tmp_path):
    root = str(tmp_path)
    _vpt_cub(root)
    src = D.get_source("fgvc/cub200", "train", data_dir=root)
    assert [src[i]["label"] for i in range(len(src))] == [0, 1, 2, 0]  # sorted ids 1, 5, 9 -> 0, 1, 2
    assert src[1]["image"].shape == (14, 20, 3)
    tv = D.get_source("fgvc/cub200", "trainval", data_dir=root)  # train.json + val.json merged
    assert len(tv) == 6 and tv[5]["label"] == 2
    assert D.dataset_info("fgvc/cub200", "trainval", data_dir=root) == {"num_examples": 6, "num_classes": 200}
    it = D.make_dataset("fgvc/cub200", "trainval", batch_size=3, image_size=8, train=True, hflip=True,
                        data_dir=root, **KW)
    b = next(it)
    it.close()
    assert b["image"].shape == (3, 8, 8, 3) and b["label"].max() <= 2
    ev = list(D.make_dataset("fgvc/cub200", "test", batch_size=2, image_size=8, train=False,
                             data_dir=os.path.join(root, "CUB_200_2011"), normalization="zero_one", **KW))
    assert [e["label"].tolist() for e in ev] == [[0, 2], [1, 0]] and ev[1]["mask"].tolist() == [1, 0]
    # Resize(8/0.875 = 9) then centre crop 8 of a constant image: the constant survives
    np.testing.assert_allclose(ev[0]["image"][1], np.full((8, 8, 3), 91 / 255.0), atol=1e-6)


def test_fgvc_tfds_and_missing_split_files(tmp_path):
    with tfds.testing.mock_data(num_examples=5):
        for name in ("fgvc/cub200", "fgvc/oxford_flowers", "fgvc/stanford_dogs", "fgvc/stanford_cars"):
            b = next(iter(D.make_dataset(name, "test", batch_size=4, image_size=16, train=False, **KW)))
            assert b["image"].shape == (4, 16, 16, 3)
            assert 0 <= b["label"].min() and b["label"].max() < D.num_classes(name)
    assert D.dataset_info("fgvc/stanford_cars", "trainval") == {"num_examples": 8144, "num_classes": 196}
    assert D.dataset_info("fgvc/nabirds", "train")["num_classes"] == 555  # VPT's sizes when no files
    with pytest.raises(D.DatasetUnavailableError, match="train.json"):
        D.get_source("fgvc/stanford_dogs", "train", data_dir=str(tmp_path))
    with pytest.raises(D.DatasetUnavailableError, match="nabirds"):
        D.get_source("fgvc/nabirds", "test", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="fgvc/cub200"):
        D.num_classes("fgvc/aircraft")


def test_k_shot_sampling():
    labels = np.repeat(np.arange(5), 7)[np.random.default_rng(0).permutation(35)]
    idx = fewshot.sample_k_shot(labels, 4, seed=1, num_classes=5)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert labels[idx].tolist() == sorted(np.repeat(np.arange(5), 4).tolist())
    np.testing.assert_array_equal(idx, fewshot.sample_k_shot(labels, 4, seed=1, num_classes=5))
    assert not np.array_equal(idx, fewshot.sample_k_shot(labels, 4, seed=2, num_classes=5))
    with pytest.raises(ValueError, match="fewer than k=8"):
        fewshot.sample_k_shot(labels, 8, seed=0, num_classes=5)
    assert fewshot.parse_split("train_16shot_seed2") == ("train", 16, 2)
    with pytest.raises(ValueError, match="train_16shot_seed0"):
        fewshot.parse_split("train16")


def test_fewshot_noah_lists(tmp_path):
    root = str(tmp_path)
    ann = os.path.join(root, "few-shot_split", "fgvc-aircraft", "annotations")
    os.makedirs(ann)
    lines = []
    for i in range(4):
        _img(os.path.join(root, "fgvc-aircraft", f"img{i}.jpg"), 40 * i)
        lines.append(f"img{i}.jpg {i % 2}")
    with open(os.path.join(ann, "train_meta.list.num_shot_2.seed_1"), "w") as f:
        f.write("\n".join(lines) + "\n")
    src = D.get_source("fewshot/fgvc_aircraft", "train_2shot_seed1", data_dir=root)
    assert len(src) == 4 and [src[i]["label"] for i in range(4)] == [0, 1, 0, 1]
    assert D.dataset_info("fewshot/fgvc_aircraft", "train_2shot_seed1", data_dir=root)["num_examples"] == 4
    it = D.make_dataset("fewshot/fgvc_aircraft", "train_2shot_seed1", batch_size=2, image_size=8, train=True,
                        random_resized_crop=True, hflip=True, data_dir=root, normalization="imagenet", **KW)
    assert next(it)["image"].shape == (2, 8, 8, 3)
    it.close()
    with pytest.raises(D.DatasetUnavailableError, match="test_meta.list"):
        D.get_source("fewshot/fgvc_aircraft", "test", data_dir=root)


def test_fewshot_sampled_from_tfds(tmp_path):
    with tfds.testing.mock_data(num_examples=150):
        src = D.get_source("fewshot/oxford_iiit_pet", "train_1shot_seed0", data_dir=str(tmp_path))
        assert len(src) == 37 and [src[i]["label"] for i in range(37)] == list(range(37))
        assert os.path.isdir(tmp_path / "jax_peft_labels")  # label cache for the next seed
        again = D.get_source("fewshot/oxford_iiit_pet", "train_1shot_seed0", data_dir=str(tmp_path))
        np.testing.assert_array_equal(src.indices, again.indices)
        other = D.get_source("fewshot/oxford_iiit_pet", "train_1shot_seed1", data_dir=str(tmp_path))
        assert not np.array_equal(src.indices, other.indices)
        assert len(D.get_source("fewshot/food101", "test")) == 150
    assert D.dataset_info("fewshot/food101", "train_16shot_seed0") == {"num_examples": 1616, "num_classes": 101}
