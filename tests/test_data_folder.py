"""Image-folder reader: the NOAH VTAB-1k export layout and generic `folder/` list files, on
PNG/JPEG files written to a temporary directory."""

import os

import numpy as np
import pytest
from PIL import Image

import jax_peft.data as D
from jax_peft.data import folder

KW = dict(process_index=0, process_count=1)


def _write_split(task_dir, split, labels, fmt="png", size=(12, 9)):
    os.makedirs(os.path.join(task_dir, "images", split), exist_ok=True)
    lines = []
    for i, lab in enumerate(labels):
        rel = f"images/{split}/{i:06d}.{ {'jpeg': 'jpg', 'gray': 'png'}.get(fmt, fmt)}"
        value = 10 * lab + i
        img = np.full((size[1], size[0], 3), value, np.uint8)
        if fmt == "gray":
            Image.fromarray(img[..., 0]).save(os.path.join(task_dir, rel))
        else:
            Image.fromarray(img).save(os.path.join(task_dir, rel), format=fmt.upper())
        lines.append(f"{rel} {lab}")
    with open(os.path.join(task_dir, f"{split}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def test_vtab_export_is_read_from_data_dir(tmp_path):
    root = str(tmp_path)
    task_dir = os.path.join(root, "cifar")  # the export's directory name for vtab/cifar100
    _write_split(task_dir, "train800", [0, 1, 2, 3, 4, 5])
    _write_split(task_dir, "val200", [6, 7], fmt="jpeg")
    _write_split(task_dir, "test", [9, 8, 7])
    # train800val200.txt absent: the reader concatenates train800 and val200
    src = D.get_source("vtab/cifar100", "train800val200", data_dir=root)
    assert len(src) == 8 and [src[i]["label"] for i in range(8)] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert src[0]["image"].shape == (9, 12, 3) and src[0]["image"].dtype == np.uint8
    assert D.dataset_info("vtab/cifar100", "test", data_dir=root) == {"num_examples": 3,
                                                                        "num_classes": 100}
    it = D.make_dataset("vtab/cifar100", "train800val200", batch_size=4, image_size=8, train=True,
                        data_dir=root, normalization="zero_one", **KW)
    b = next(it)
    it.close()
    assert b["image"].shape == (4, 8, 8, 3) and b["label"].dtype == np.int32
    ev = list(D.make_dataset("vtab/cifar100", "test", batch_size=2, image_size=8, train=False,
                             data_dir=root, normalization="zero_one", **KW))
    assert [e["label"].tolist() for e in ev] == [[9, 8], [7, 0]]
    assert ev[1]["mask"].tolist() == [1.0, 0.0]
    # PNG is lossless: pixel values survive decoding and a same-size resize
    np.testing.assert_allclose(ev[0]["image"][0], np.full((8, 8, 3), 90 / 255.0), atol=1e-6)


def test_generic_folder_family_and_grayscale(tmp_path):
    root = str(tmp_path)
    _write_split(os.path.join(root, "mydata"), "train", [0, 2, 1, 2], fmt="gray")
    _write_split(os.path.join(root, "mydata"), "test", [1, 4])
    assert D.num_classes("folder/mydata", data_dir=root) == 5
    assert D.dataset_info("folder/mydata", "train", data_dir=root) == {"num_examples": 4,
                                                                      "num_classes": 5}
    src = D.get_source("folder/mydata", "train", data_dir=root)
    assert src[1]["image"].shape == (9, 12, 3) and src[1]["label"] == 2  # gray tiled to RGB
    with pytest.raises(FileNotFoundError, match="available splits: test, train"):
        D.get_source("folder/mydata", "val", data_dir=root)
    with pytest.raises(ValueError, match="needs data_dir"):
        D.get_source("folder/mydata", "train")


def test_list_file_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a.png 1\nb.png\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        folder.read_list(str(bad))
    bad.write_text("a.png one\n")
    with pytest.raises(ValueError, match="not an integer"):
        folder.read_list(str(bad))
    ok = tmp_path / "ok.txt"
    ok.write_text("dir with space/a.png 3\n")
    src = folder.ListSource(str(ok))
    assert src.paths == ["dir with space/a.png"]
    with pytest.raises(FileNotFoundError, match="listed in"):
        src[0]


def test_prepare_list_and_vtab_export_roundtrip(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    from jax_peft.data import prepare, vtab

    assert prepare.main(["--list", "vtab", "fgvc/nabirds", "fewshot/fgvc_aircraft"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 21 and "clevr:3.*.*" in out[11] and "(not in TFDS)" in out[19]
    assert "manual" in [line for line in out if line.startswith("vtab/resisc45")][0]
    with pytest.raises(ValueError, match="vtab/caltech101"):
        prepare.tfds_targets("imagenet")
    root = str(tmp_path / "export")
    with tfds.testing.mock_data(num_examples=3):
        counts = prepare.export_vtab("vtab/dsprites_loc", root, splits=("test", "train800"))
        ref = vtab.get_source("vtab/dsprites_loc", "test")
        ref = [ref[i] for i in range(3)]
    assert counts == {"test": 3, "train800": 3}
    src = D.get_source("vtab/dsprites_loc", "test", data_dir=root)  # read back as the export
    assert isinstance(src, folder.ListSource)
    assert [src[i]["label"] for i in range(3)] == [r["label"] for r in ref]
    img = src[0]["image"]
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    # JPEG (quality 75) is lossy: close to the fixed TFDS pixels, not equal
    assert np.abs(img.astype(int) - ref[0]["image"].astype(int)).mean() < 40
