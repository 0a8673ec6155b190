"""The demo's pipeline end to end at a reduced size (`--quick`: width 32, 1 block, a few steps)."""

import json
import os

import numpy as np

from jax_peft import demo


def test_demo_quick_end_to_end(tmp_path, capsys):
    wd = str(tmp_path / "demo")
    rc = demo.main(["--workdir", wd, "--quick", "--methods", "linear,rlrr"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "What this demo shows" in out and "does not show" in out

    with open(os.path.join(wd, "demo_summary.json")) as f:
        summary = json.load(f)
    assert [r["method"] for r in summary["results"]] == ["linear", "rlrr"]
    for r in summary["results"]:
        assert set(r) >= {"method", "trainable_params", "test_accuracy", "time_s"}
        assert isinstance(r["trainable_params"], int) and r["trainable_params"] >= 0
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["time_s"] > 0
    by = {r["method"]: r for r in summary["results"]}
    assert by["linear"]["trainable_params"] == 0 < by["rlrr"]["trainable_params"]
    assert "fraction" in summary["accuracy_unit"]

    # The cached backbone is a Google-layout .npz that reloads, and a second call reuses it.
    from jax_peft import checkpoint as ck

    backbone = summary["pretrain"]["backbone"]
    params = ck.load_checkpoint(backbone)
    assert params["embedding"]["kernel"].shape == (8, 8, 3, 32)
    mtime = os.path.getmtime(backbone)
    path, info = demo.pretrain(wd, quick=True)
    assert path == backbone and os.path.getmtime(backbone) == mtime
    assert info["test_accuracy"] == summary["pretrain"]["test_accuracy"]
    # The cache is keyed by seed and config: another seed (or the full-size config) gets its own file.
    assert os.path.basename(backbone).startswith("upstream_vit_seed0_")
    others = {demo.backbone_path(wd, demo._config("pretrain", quick, seed)) for quick, seed in
              ((True, 1), (False, 0), (False, 1))}
    assert backbone not in others and len(others) == 3

    # The merged export of the best PEFT method reloads and reproduces the adapted logits.
    check = summary["merge_check"]
    assert summary["best_peft"] == "rlrr" and check["method"] == "rlrr"
    merged = ck.load_checkpoint(check["path"])
    assert merged["head"]["kernel"].shape == (32, 8)
    assert check["max_abs_logit_diff"] < 1e-4 and check["argmax_agreement"] == 1.0
    # merging changed the weights (the adapter is not a no-op after training)
    assert not np.allclose(merged["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"],
                           params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"])


def test_format_table_and_bad_methods(tmp_path):
    t = demo.format_table([{"method": "rlrr", "trainable_params": 1234, "test_accuracy": 0.5, "time_s": 1.0}])
    assert "rlrr" in t and "1,234" in t and "0.500" in t
    import pytest

    with pytest.raises(ValueError, match="linear"):
        demo.run(str(tmp_path), methods=["rlrr"], quick=True)
