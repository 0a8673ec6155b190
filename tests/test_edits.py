"""One definition per method (sites + edits): float64 parity of every method, dtype preservation, a
user-registered method, adapter/model mismatch checks and hyper-parameter validation."""

from __future__ import annotations

import json
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import DATA, random_params, tiny_vit_config
from formula import formula_input, formula_params

import jax_peft
from jax_peft import paths
from jax_peft.methods.edits import OutputAffine

KEY = jax.random.PRNGKey(0)
# The methods without an official adapter golden (RLRR's is below; FacT-TT/TK and EFFT are checked in
# float64 in test_fact_efft.py), with options that make `init` the identity (the pretrained function).
IDENTITY = {"ssf": dict(init="identity"), "lora": dict(rank=4, alpha=2.0), "bitfit": {}, "linear": {}, "full": {}}


def _rel(ours, gold) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - gold)) / max(np.max(np.abs(gold)), 1e-4))


def test_every_method_float64_matches_the_official_plain_model():
    """Identity adapters of every method keep a float64 tree bit for bit (so their logits are the
    plain model's, which match timm's float64 logits to 1e-9): no method rounds a float64 tree
    through float32 (LoRA's and RLRR's apply used to, 4e-8 relative)."""
    z = np.load(DATA / "plain_exact_d2.npz")
    x, _ = formula_input()
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), formula_params(2))
        model = jax_peft.ViT(jax_peft.vit_config(params, dtype="float64"))
        logits = model.apply({"params": params}, jnp.asarray(x, jnp.float64), train=False)
        assert _rel(logits, z["logits"]) < 1e-9
        for name, hp in IDENTITY.items():
            method = jax_peft.get_method(name, **hp)
            eff = method.apply(params, method.init(KEY, params))
            for a, b in zip(jax.tree_util.tree_leaves(eff), jax.tree_util.tree_leaves(params)):
                assert a.dtype == jnp.float64, name
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_rlrr_float64_matches_official_logits_and_gradients():
    z = np.load(DATA / "rlrr_d2.npz")
    sd = {k[len("adapter/"):]: z[k] for k in z.files if k.startswith("adapter/")}
    gold = {k[len("grad/"):]: z[k] for k in z.files if k.startswith("grad/")}
    x, labels = formula_input()
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), formula_params(2))
        model = jax_peft.ViT(jax_peft.vit_config(params, gelu="exact", dtype="float64"))
        method = jax_peft.get_method("rlrr")
        adapter = jax_peft.from_official("rlrr", sd, params=params)
        assert all(a.dtype == jnp.float64 for a in jax.tree_util.tree_leaves(adapter))

        def loss(adapter, head):
            logits = model.apply({"params": method.apply({**params, "head": head}, adapter)},
                                 jnp.asarray(x, jnp.float64), train=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean(), logits

        (_, logits), (g_ad, g_head) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            adapter, params["head"])
        ours = method.to_official({"adapter": g_ad, "head": g_head})
    assert _rel(logits, z["logits"]) < 1e-9
    bad = {k: e for k, g in gold.items() if (e := _rel(ours[k], g)) > 1e-6}
    assert not bad, bad


def test_identity_lora_keeps_a_float64_kernel_exactly():
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) / 3,
                                        random_params(tiny_vit_config(num_layers=1), 0))
        method = jax_peft.get_method("lora", rank=2, alpha=3.0)
        adapter = method.init(KEY, params)
        for eff in (method.apply(params, adapter), jax_peft.merge(params, method, adapter)):
            for a, b in zip(jax.tree_util.tree_leaves(eff), jax.tree_util.tree_leaves(params)):
                assert a.dtype == jnp.float64
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- a method of one's own ---------------------------------------------------------------------------
class DiagQV(jax_peft.Method):
    """Scales the outputs of q and v by learned vectors (the docs' ten-line example)."""

    edit_kinds: ClassVar[tuple] = (OutputAffine,)

    def init(self, rng, params):
        chosen = [s for s in jax_peft.sites.sites(params).values() if s.kind in ("q", "v")]
        return paths.unflatten({f"{s.name}/{leaf}": jnp.full(s.d_out, float(leaf == "scale"))
                                for s in chosen for leaf in ("scale", "shift")})

    def edits(self, params, adapter, *, rng=None):
        return {site: OutputAffine(lv["scale"], lv["shift"]) for site, lv in paths.group_by_node(adapter).items()}


@pytest.fixture
def diag_qv():
    """DiagQV registered as "diag_qv" for one test (other test files enumerate the registry)."""
    from jax_peft.methods import base

    yield jax_peft.register_method("diag_qv")(DiagQV)
    base._CLASSES.pop("diag_qv", None)


def test_registered_method_gets_the_library_for_free(diag_qv):
    method = jax_peft.get_method("diag_qv")
    assert "diag_qv" in jax_peft.method_names() and isinstance(method, DiagQV)
    assert method.has_activation_form() and method.affine_in_leaves() and not method.has_official_layout()
    params = random_params(tiny_vit_config(), 0)
    adapter = jax.tree_util.tree_map(lambda a: a + 0.1, method.init(KEY, params))
    assert method.num_params(adapter) == 2 * 2 * 2 * 32
    eff = method.apply(params, adapter)
    q = "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"
    np.testing.assert_allclose(np.asarray(paths.get(eff, q)), 1.1 * paths.get(params, q), rtol=1e-6)
    k = "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/key/kernel"
    np.testing.assert_array_equal(np.asarray(paths.get(eff, k)), paths.get(params, k))
    # weight form == activation form == merge
    from jax_peft.methods.activation import forward

    model = jax_peft.ViT(tiny_vit_config())
    x = jax.random.normal(KEY, (2, 32, 32, 3))
    a = forward(model, method, params, adapter, x, form="activation")
    w = forward(model, method, params, adapter, x, form="weight")
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-5, atol=1e-5)
    for m, e in zip(jax.tree_util.tree_leaves(jax_peft.merge(params, method, adapter)), jax.tree_util.tree_leaves(eff)):
        np.testing.assert_allclose(np.asarray(m), np.asarray(e), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="built-in"):
        jax_peft.register_method("lora")


# --- adapters for another model ----------------------------------------------------------------------
MISMATCH = {"rlrr": {}, "lora": {}, "fact_tt": dict(rank=4), "ssf": {}, "bitfit": {}, "full": {}}


@pytest.mark.parametrize("name", list(MISMATCH))
def test_adapter_for_another_model_is_refused_in_one_error(name):
    method = jax_peft.get_method(name, **MISMATCH[name])
    two = random_params(tiny_vit_config(num_layers=2), 0)
    three = random_params(tiny_vit_config(num_layers=3), 0)
    ad2 = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype), jax.eval_shape(method.init, KEY, two))
    with pytest.raises(ValueError, match=r"(missing|wrong shape) \(\d+\).*method.init") as e:
        method.apply(three, ad2)
    if name not in ("fact_tt", "efft"):  # per-block leaves: the missing block is named
        assert "encoderblock_2" in str(e.value)
    with pytest.raises(ValueError, match="does not"):
        jax_peft.merge(three, method, ad2)
    with pytest.raises(ValueError, match="does not"):  # static: also under jit
        jax.jit(method.apply)(three, ad2)
    patch4 = random_params(tiny_vit_config(num_layers=2, patch_size=4), 0)
    if name == "full":  # the patch kernel and position embedding differ
        with pytest.raises(ValueError, match="wrong shape.*embedding"):
            method.apply(patch4, ad2)
    else:  # the adapter's shapes fit; the spec recorded with it knows the model
        with pytest.raises(ValueError, match=r"model patch: stored \[\[192, 32\]\], requested \[\[48, 32\]\]"):
            jax_peft.merge(patch4, method, ad2, spec=method.spec(two))


def test_merge_refuses_other_hyper_parameters():
    params = random_params(tiny_vit_config(), 0)
    trained = jax_peft.get_method("lora", rank=4, alpha=8.0)
    adapter = trained.init(KEY, params)
    spec = json.loads(json.dumps(trained.spec(params)))  # as stored beside an adapter
    jax_peft.merge(params, trained, adapter, spec=spec)
    with pytest.raises(ValueError, match="alpha: stored 8.0, requested 4.0"):
        jax_peft.merge(params, jax_peft.get_method("lora", rank=4, alpha=4.0), adapter, spec=spec)


@pytest.mark.parametrize("name,hp,match", [
    ("lora", dict(alpha=0), "alpha must be a finite non-zero number"),
    ("lora", dict(alpha=float("inf")), "alpha must be a finite"),
    ("lora", dict(rank=-2), "rank must be a positive integer"),
    ("lora", dict(layers=[-1]), "block indices >= 0"),
    ("fact_tt", dict(scale=float("nan")), "scale must be a finite"),
    ("fact_tk", dict(rank=0), "rank must be a positive integer"),
    ("efft", dict(scale=0.0), "scale must be a finite non-zero"),
    ("efft", dict(dropout=-0.1), r"dropout must be a float in \[0, 1\)"),
    ("rlrr", dict(layers=[]), "non-empty"),
    ("ssf", dict(layers=[-3]), "block indices >= 0"),
])
def test_hyper_parameters_are_validated_at_construction(name, hp, match):
    with pytest.raises(ValueError, match=match):
        jax_peft.get_method(name, **hp)
