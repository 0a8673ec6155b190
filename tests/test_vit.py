"""The ViT through the public API: golden parity from a Google-layout file, and model sizes."""

import numpy as np
import pytest

import jax_peft
from jax_peft import paths

# checkpoints.md section 2: (params without head, params with a 1000-class head), at 224 px.
PARAM_COUNTS = {
    "ViT-Ti/16": (5_524_416, 5_717_416),
    "ViT-S/32": (22_493_952, 22_878_952),
    "ViT-S/16": (21_665_664, 22_050_664),
    "ViT-B/32": (87_455_232, 88_224_232),
    "ViT-B/16": (85_798_656, 86_567_656),
    "ViT-B/8": (85_807_872, 86_576_872),
    "ViT-L/32": (305_510_400, 306_535_400),
    "ViT-L/16": (303_301_632, 304_326_632),
    "ViT-H/14": (630_764_800, 632_045_800),
    # Zhai et al. 2022 ("Scaling Vision Transformers"), Table 2: 1011M and 1843M parameters.
    "ViT-g/14": (1_011_202_432, 1_012_611_432),
    "ViT-G/14": (1_842_775_680, 1_844_440_680),
    # SigLIP image towers with their MAP head (big_vision So400m and g-opt), 224 px: ~0.4B and ~1.1B
    "ViT-So400m/14": (427_680_704, 428_833_704),
    "ViT-g-opt/16": (1_163_076_096, 1_164_613_096),
}


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("gelu,name", [("exact", "plain_exact_d2"), ("tanh", "plain_tanh_d2")])
def test_golden_logits_and_features_from_npz(formula_npz, golden, gelu, name):
    """formula checkpoint -> pre-Linen .npz -> load_checkpoint -> vit_config -> ViT == official."""
    g = golden(name)
    params = jax_peft.load_checkpoint(formula_npz)
    cfg = jax_peft.vit_config(params, gelu=gelu)
    assert (cfg.patch_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (16, 768, 2, 12, 3072)
    assert (cfg.num_classes, cfg.image_size, cfg.classifier, cfg.representation_size) == (10, 32, "token", None)
    logits, feats = jax_peft.ViT(cfg).apply({"params": params}, g["x"], train=False, return_features=True)
    assert logits.shape == (4, 10) and feats.shape == (4, 768)
    assert _rel(logits, g["logits"]) < 1e-4
    assert _rel(feats, g["features"]) < 1e-4


def test_gelu_kinds_differ_on_golden(golden):
    """The two golden files are distinguishable, so the parity test above really checks the GELU."""
    a, b = golden("plain_exact_d2")["logits"], golden("plain_tanh_d2")["logits"]
    assert _rel(a, b) > 1e-5


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_named_config_parameter_counts(name):
    no_head, with_head = PARAM_COUNTS[name]
    shapes = jax_peft.param_shapes(jax_peft.vit_config(name, num_classes=1000))
    assert paths.count(shapes) == with_head
    assert paths.count({k: v for k, v in shapes.items() if k != "head"}) == no_head
    assert "pre_logits" not in shapes


def test_vit_config_infers_tiny_tree(tiny_config, tiny_params):
    cfg = jax_peft.vit_config(tiny_params)
    for field in ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "num_classes",
                  "image_size", "classifier", "representation_size"):
        assert getattr(cfg, field) == getattr(tiny_config, field), field


def test_in21k_b16_file_shape():
    """checkpoints.md section 3: the ImageNet-21k B/16 file has 202 arrays and 103,186,515 parameters."""
    cfg = jax_peft.vit_config("ViT-B/16", num_classes=21843, representation_size=768)
    shapes = paths.flatten(jax_peft.param_shapes(cfg))
    assert len(shapes) == 202 and paths.count(shapes) == 103_186_515
    assert shapes["Transformer/posembed_input/pos_embedding"].shape == (1, 197, 768)
    assert shapes["pre_logits/kernel"].shape == (768, 768)
