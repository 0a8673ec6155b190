"""The method contract, for every registered method: merge equivalence, shapes/dtypes, identity at
init, exact ViT-B/16 counts (from shapes only), errors, export of merged params; plus an independent
activation-form reference for SSF."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, tiny_vit_config

import jax_peft
from jax_peft import paths
from jax_peft.methods.base import _REGISTRY

KEY = jax.random.PRNGKey(0)

# hyper-parameters under which each method claims to start exactly at the pretrained model
IDENTITY = {"rlrr": dict(init="identity"), "ssf": dict(init="identity"), "fact_tt": {}, "fact_tk": {},
            "efft": {}, "lora": {}, "bitfit": {}, "linear": {}, "full": {}}

# (method, hparams, exact trainable count without head for ViT-B/16) — issue 3 / methods.md §2, §7
COUNTS = [
    ("rlrr", {}, 288_768),
    ("fact_tt", dict(rank=4), 8_448),
    ("fact_tt", dict(rank=8), 21_504),
    ("fact_tt", dict(rank=16), 61_440),
    ("fact_tk", dict(rank=8), 13_952),
    ("fact_tk", dict(rank=32), 86_528),
    ("efft", dict(rank=16, variant="shared"), 87_552),
    ("efft", dict(rank=32, variant="shared"), 178_176),
    ("efft", dict(rank=32, variant="per_layer"), 245_760),
    ("ssf", {}, 205_824),
    ("lora", dict(rank=8), 294_912),
    ("lora", dict(rank=8, variant="fused_qkv"), 294_912),
    ("bitfit", {}, 102_912),
    ("linear", {}, 0),
    ("full", {}, 85_798_656),
]

RANKED = ("lora", "fact_tt", "fact_tk", "efft")
# (method, hparams) whose selection regex matches nothing
EMPTY_SELECTIONS = [("bitfit", dict(targets="no_such_leaf")), ("rlrr", dict(targets="no_such_module")),
                    ("ssf", dict(targets="no_such_module")), ("lora", dict(targets=("no_such_module",)))]


def _get(name: str, **hparams):
    """The method, skipping only while its module has not landed yet."""
    module = _REGISTRY[name].split(":")[0]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            pytest.skip(f"{module} is not implemented yet")
        raise
    return jax_peft.get_method(name, **hparams)

# the generic checks run on a ViT; backbone-specific variants (rlrr_swin, ...) are tested with their backbone
VIT_METHODS = [n for n in jax_peft.method_names() if not n.endswith("_swin")]


def _tiny():
    cfg = tiny_vit_config()
    return cfg, random_params(cfg, 0), jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)


def _perturb(adapter, scale=0.05):
    """Random non-trivial adapter values (identity-at-init adapters would make tests vacuous)."""
    leaves, tree = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.PRNGKey(7), max(len(leaves), 1))
    return jax.tree_util.tree_unflatten(
        tree, [x + scale * jax.random.normal(k, jnp.shape(x), jnp.float32).astype(jnp.result_type(x))
               for x, k in zip(leaves, keys)])


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.mark.parametrize("name", VIT_METHODS)
def test_merge_equals_apply_and_exports(name, tmp_path):
    method = _get(name)
    cfg, params, x = _tiny()
    model = jax_peft.ViT(cfg)
    adapter = _perturb(method.init(KEY, params))
    via_apply = model.apply({"params": method.apply(params, adapter)}, x)
    merged = jax_peft.merge(params, method, adapter)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    for m, p in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)):
        assert m.shape == np.shape(p) and m.dtype == jnp.float32
    via_merge = model.apply({"params": merged}, x)
    assert _rel(via_merge, via_apply) < 1e-5
    if name != "linear":  # the adapter really changes the function
        assert _rel(via_merge, model.apply({"params": params}, x)) > 1e-4

    ckpt = pytest.importorskip("jax_peft.checkpoint")
    path = ckpt.save_checkpoint(tmp_path / "merged.npz", merged)
    reloaded = jax_peft.load_checkpoint(str(path))
    assert _rel(model.apply({"params": reloaded}, x), via_merge) < 1e-6


@pytest.mark.parametrize("name", VIT_METHODS)
def test_apply_preserves_structure_shapes_and_dtypes(name):
    method = _get(name)
    _, params, _ = _tiny()
    for dtype in (jnp.float32, jnp.bfloat16):
        p = jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), params)
        eff = method.apply(p, method.init(KEY, p))
        assert jax.tree_util.tree_structure(eff) == jax.tree_util.tree_structure(p)
        for e, q in zip(jax.tree_util.tree_leaves(eff), jax.tree_util.tree_leaves(p)):
            assert e.shape == q.shape and e.dtype == q.dtype, (name, dtype)


@pytest.mark.parametrize("name", VIT_METHODS)
def test_identity_at_init(name):
    method = _get(name, **IDENTITY[name])
    _, params, _ = _tiny()
    eff = method.apply(params, method.init(KEY, params))
    for e, p in zip(jax.tree_util.tree_leaves(eff), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(np.asarray(e), p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["rlrr", "ssf"])
def test_official_init_is_not_identity(name):
    method = _get(name)
    _, params, _ = _tiny()
    eff = paths.flatten(method.apply(params, method.init(KEY, params)))
    k = "Transformer/encoderblock_0/LayerNorm_0/scale"
    assert not np.allclose(np.asarray(eff[k]), paths.flatten(params)[k])


@pytest.mark.parametrize("name,hparams,count", COUNTS, ids=[f"{n}-{h}" for n, h, _ in COUNTS])
def test_vit_b16_counts_from_shapes(name, hparams, count):
    method = _get(name, **hparams)
    shapes = jax_peft.param_shapes(jax_peft.vit_config("ViT-B/16"))
    adapter = jax.eval_shape(method.init, KEY, shapes)
    assert method.num_params(adapter) == count


@pytest.mark.parametrize("model_name,count", [("ViT-L/16", 765_952), ("ViT-H/14", 1_274_880)])
def test_rlrr_counts_on_larger_backbones(model_name, count):
    method = _get("rlrr")
    shapes = jax_peft.param_shapes(jax_peft.vit_config(model_name))
    assert method.num_params(jax.eval_shape(method.init, KEY, shapes)) == count


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="unknown method"):
        jax_peft.get_method("adapterformer")
    for name in jax_peft.method_names():
        _get(name)
        with pytest.raises(TypeError, match="unknown option"):
            jax_peft.get_method(name, no_such_option=1)


@pytest.mark.parametrize("name", RANKED)
def test_rank_larger_than_width(name):
    _get(name)
    _, params, _ = _tiny()  # width 32
    with pytest.raises(ValueError, match="rank"):
        jax_peft.get_method(name, rank=64).init(KEY, params)


@pytest.mark.parametrize("name,hparams", EMPTY_SELECTIONS, ids=[n for n, _ in EMPTY_SELECTIONS])
def test_selection_matching_nothing(name, hparams):
    _, params, _ = _tiny()
    with pytest.raises(ValueError, match="select"):
        _get(name, **hparams).init(KEY, params)


@pytest.mark.parametrize("name", VIT_METHODS)
def test_masks_cover_the_trainable_tree(name):
    method = _get(name)
    _, params, _ = _tiny()
    adapter = method.init(KEY, params)
    trainable = {"adapter": adapter, "head": params["head"]}
    decay = method.decay_mask(trainable)
    assert jax.tree_util.tree_structure(decay) == jax.tree_util.tree_structure(trainable)
    assert all(isinstance(v, bool) for v in jax.tree_util.tree_leaves(decay))
    mask = method.trainable_mask(params)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    assert paths.flatten(mask)["head/kernel"]
    assert isinstance(method.summary(), str) and method.name in method.summary()


def test_bitfit_and_full_masks_mark_exactly_their_leaves():
    _, params, _ = _tiny()
    bitfit = jax_peft.get_method("bitfit")
    marked = {p for p, v in paths.flatten(bitfit.trainable_mask(params)).items() if v}
    adapter_paths = set(paths.flatten(bitfit.init(KEY, params)))
    assert marked == adapter_paths | {"head/kernel", "head/bias"}
    assert all(p.endswith("bias") for p in adapter_paths)
    assert "Transformer/encoderblock_1/LayerNorm_1/bias" in adapter_paths
    assert "Transformer/encoder_norm/bias" in adapter_paths and "embedding/bias" in adapter_paths
    full = jax_peft.get_method("full")
    assert all(jax.tree_util.tree_leaves(full.trainable_mask(params)))
    assert set(paths.flatten(full.init(KEY, params))) == {p for p in paths.flatten(params) if not p.startswith("head/")}
    assert jax_peft.get_method("linear").init(KEY, params) == {}


def test_lora_fused_qkv_changes_q_k_v_and_shares_a():
    _, params, _ = _tiny()
    method = jax_peft.get_method("lora", variant="fused_qkv", alpha=16)
    adapter = _perturb(method.init(KEY, params))
    node = adapter["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["qkv"]
    assert node["lora_a"].shape == (32, 8) and node["lora_b"].shape == (8, 96)
    eff = paths.flatten(method.apply(params, adapter))
    base = paths.flatten(params)
    a, b = np.asarray(node["lora_a"]), np.asarray(node["lora_b"])
    for j, m in enumerate(("query", "key", "value")):
        k = f"Transformer/encoderblock_0/MultiHeadDotProductAttention_0/{m}/kernel"
        delta = (np.asarray(eff[k]) - base[k]).reshape(32, 32)
        np.testing.assert_allclose(delta, 2.0 * a @ b[:, 32 * j:32 * (j + 1)], rtol=1e-4, atol=1e-6)


def test_lora_init_bounds():
    _, params, _ = _tiny()
    ad = jax_peft.get_method("lora").init(KEY, params)
    q = ad["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]
    assert np.max(np.abs(q["lora_a"])) <= 1 / np.sqrt(32) and np.all(q["lora_b"] == 0)


# --- an independent activation-form reference for SSF ------------------------------------------------

def _reference_forward(params, x, ssf):
    """Plain-jnp ViT (token classifier, exact GELU) with SSF `y ⊙ γ + β` applied on activations at the
    official placements; `ssf(name)` returns (γ, β) or None for each hook."""
    def hook(name, y):
        s = ssf(name)
        return y if s is None else y * s[0] + s[1]

    def ln(p, y):
        mu = y.mean(-1, keepdims=True)
        var = ((y - mu) ** 2).mean(-1, keepdims=True)
        return (y - mu) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]

    hi = jax.lax.Precision.HIGHEST
    e = params["embedding"]
    y = jax.lax.conv_general_dilated(x, e["kernel"], e["kernel"].shape[:2], "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=hi) + e["bias"]
    b, h, w, d = y.shape
    y = hook("patch", y.reshape(b, h * w, d))
    y = jnp.concatenate([jnp.tile(params["cls"], (b, 1, 1)), y], 1)
    y = y + params["Transformer"]["posembed_input"]["pos_embedding"]
    i = 0
    while f"encoderblock_{i}" in params["Transformer"]:
        p = params["Transformer"][f"encoderblock_{i}"]
        a = p["MultiHeadDotProductAttention_0"]
        z = hook(f"{i}/ln1", ln(p["LayerNorm_0"], y))
        qkv = jnp.concatenate([jnp.einsum("btd,dhk->bthk", z, a[m]["kernel"], precision=hi) + a[m]["bias"]
                               for m in ("query", "key", "value")], axis=2)  # (B, T, 3H, hd)
        heads = a["query"]["kernel"].shape[1]
        qkv = hook(f"{i}/qkv", qkv.reshape(b, -1, 3 * d)).reshape(b, -1, 3 * heads, d // heads)
        q, k, v = jnp.split(qkv, 3, axis=2)
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q / np.sqrt(d // heads), k, precision=hi), -1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v, precision=hi)
        o = jnp.einsum("bqhd,hdD->bqD", o, a["out"]["kernel"], precision=hi) + a["out"]["bias"]
        y = y + hook(f"{i}/o", o)
        z = hook(f"{i}/ln2", ln(p["LayerNorm_1"], y))
        mlp = p["MlpBlock_0"]
        z = hook(f"{i}/fc1", jnp.dot(z, mlp["Dense_0"]["kernel"], precision=hi) + mlp["Dense_0"]["bias"])
        z = jax.nn.gelu(z, approximate=False)
        y = y + hook(f"{i}/fc2", jnp.dot(z, mlp["Dense_1"]["kernel"], precision=hi) + mlp["Dense_1"]["bias"])
        i += 1
    y = hook("final", ln(params["Transformer"]["encoder_norm"], y))
    return jnp.dot(y[:, 0], params["head"]["kernel"], precision=hi) + params["head"]["bias"]


def test_ssf_weight_form_equals_activation_form():
    cfg, params, x = _tiny()
    model = jax_peft.ViT(cfg)
    plain = _reference_forward(params, x, lambda name: None)
    assert _rel(plain, model.apply({"params": params}, x)) < 1e-5  # the reference is a faithful ViT

    method = jax_peft.get_method("ssf")
    adapter = _perturb(method.init(KEY, params), 0.2)
    flat = paths.flatten(adapter)
    at = {"patch": "embedding", "final": "Transformer/encoder_norm"}
    rel = {"ln1": "LayerNorm_0", "qkv": "MultiHeadDotProductAttention_0/qkv",
           "o": "MultiHeadDotProductAttention_0/out", "ln2": "LayerNorm_1", "fc1": "MlpBlock_0/Dense_0",
           "fc2": "MlpBlock_0/Dense_1"}

    def ssf(name):
        if name in at:
            node = at[name]
        else:
            i, site = name.split("/")
            node = f"Transformer/encoderblock_{i}/{rel[site]}"
        return flat[f"{node}/ssf_scale"], flat[f"{node}/ssf_shift"]

    ref = _reference_forward(params, x, ssf)
    ours = model.apply({"params": method.apply(params, adapter)}, x)
    assert _rel(ours, ref) < 1e-5
    assert _rel(ours, plain) > 1e-2


def test_regex_targets_match_module_or_leaf_paths():
    _, params, _ = _tiny()
    by_leaf = jax_peft.get_method("lora", targets=(r"encoderblock_1/MlpBlock_0/Dense_1/kernel",))
    assert paths.leaf_paths(by_leaf.init(KEY, params)) == [
        "Transformer/encoderblock_1/MlpBlock_0/Dense_1/lora_a", "Transformer/encoderblock_1/MlpBlock_0/Dense_1/lora_b"]
    mixed = jax_peft.get_method("lora", targets=("q", r"Dense_0$"), rank=4)
    assert mixed.num_params(mixed.init(KEY, params)) == 2 * (4 * (32 + 32) + 4 * (32 + 64))
    ssf = jax_peft.get_method("ssf", targets=r"encoderblock_0/MlpBlock_0/Dense_0/kernel")
    assert paths.leaf_paths(ssf.init(KEY, params)) == [
        "Transformer/encoderblock_0/MlpBlock_0/Dense_0/ssf_scale", "Transformer/encoderblock_0/MlpBlock_0/Dense_0/ssf_shift"]
