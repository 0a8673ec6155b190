"""jax_peft.analysis: spectral lens and φ on matrices with known spectra/subspaces, adapter arithmetic
rules, swapping without recompilation, plots and the report CLI (tiny models only)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_peft import paths, vit
from jax_peft import sites as layers
from jax_peft.analysis import arithmetic as ar
from jax_peft.analysis import similarity as si
from jax_peft.analysis import spectral as sp
from jax_peft.analysis.swap import SwappableForward
from jax_peft.methods.base import get_method

RNG = np.random.default_rng(0)
CFG = vit.ViTConfig(patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, num_classes=5,
                    image_size=16)


def orth(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(n, k)))[0]


def f32(x):
    return jnp.asarray(x, jnp.float32)


@pytest.fixture(scope="module")
def params():
    return jax.tree_util.tree_map(np.asarray, vit.init_params(CFG, jax.random.PRNGKey(0)))


def method_or_skip(name: str, **hp):
    try:
        return get_method(name, **hp)
    except (ImportError, AttributeError) as e:  # a method module not landed yet
        pytest.skip(f"method {name} unavailable: {e}")


def perturbed(method, params, seed: int, scale: float = 0.1):
    a = method.init(jax.random.PRNGKey(seed), params)
    leaves, tdef = jax.tree_util.tree_flatten(a)
    keys = jax.random.split(jax.random.PRNGKey(100 + seed), max(len(leaves), 1))
    return jax.tree_util.tree_unflatten(
        tdef, [x + scale * jax.random.normal(k, jnp.shape(x)) for x, k in zip(leaves, keys)])


def tree_max_diff(a, b) -> float:
    fa, fb = paths.flatten(a), paths.flatten(b)
    assert set(fa) == set(fb)
    return max(float(np.max(np.abs(np.asarray(fa[p], np.float64) - np.asarray(fb[p], np.float64)))) for p in fa)


# --- spectral statistics on matrices with known answers ------------------------------------------
def test_known_spectra_relative_change_and_delta():
    m, n = 24, 40
    u, v = orth(m, m, 1), orth(n, m, 2)
    s = np.linspace(8.0, 1.0, m)
    s2 = s * (1.0 + np.linspace(0.2, -0.1, m))  # still descending
    w, w2 = (u * s) @ v.T, (u * s2) @ v.T
    out = jax.device_get(sp.matrix_spectra(f32(w), f32(w2), k=3))
    np.testing.assert_allclose(out["s_base"], s, rtol=1e-5)
    np.testing.assert_allclose(out["s_adapted"], s2, rtol=1e-5)
    np.testing.assert_allclose(out["rel_change"], (s2 - s) / s, atol=2e-5)
    np.testing.assert_allclose(out["delta_s"], np.sort(np.abs(s2 - s))[::-1], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(out["delta_fro"], np.linalg.norm(s2 - s), rtol=1e-5)
    np.testing.assert_allclose(out["base_fro"], np.linalg.norm(s), rtol=1e-5)
    # same singular vectors: top-k subspaces unchanged on both sides
    np.testing.assert_allclose(out["angles_left"], 0.0, atol=1e-3)
    np.testing.assert_allclose(out["angles_right"], 0.0, atol=1e-3)
    np.testing.assert_allclose(out["overlap_left"], 1.0, atol=1e-6)


@pytest.mark.parametrize("svals,erank", [((1.0, 1.0, 1.0), 3.0), ((3.0, 1.0), math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))),
                                         ((2.0,), 1.0)])
def test_delta_of_known_rank_and_effective_rank(svals, erank):
    m, n, r = 32, 48, len(svals)
    w = RNG.normal(size=(m, n))
    d = (orth(m, r, 3) * np.asarray(svals)) @ orth(n, r, 4).T
    out = jax.device_get(sp.matrix_spectra(f32(w), f32(w + d), k=2))
    assert int(out["delta_rank"]) == r
    np.testing.assert_allclose(out["delta_erank"], erank, rtol=1e-4)
    np.testing.assert_allclose(out["delta_s"][:r], svals, rtol=1e-4)


def test_rank_of_zero_delta_and_effective_rank_rules():
    w = f32(RNG.normal(size=(16, 16)))
    out = jax.device_get(sp.matrix_spectra(w, w, k=4))
    assert int(out["delta_rank"]) == 0 and float(out["delta_erank"]) == 0.0 and float(out["delta_fro"]) == 0.0
    np.testing.assert_allclose(out["angles_left"], 0.0, atol=1e-3)
    # erank: r equal values -> r; bounded by the count; tolerance drops tiny values
    assert float(sp.effective_rank(jnp.ones(5))) == pytest.approx(5.0, rel=1e-6)
    assert float(sp.effective_rank(jnp.array([1.0, 0.5, 0.25, 0.0]))) < 3.0
    assert float(sp.effective_rank(jnp.array([1.0, 1.0, 1e-9]), tol=1e-6)) == pytest.approx(2.0, rel=1e-6)
    assert int(si.numerical_rank(jnp.array([5.0, 1.0, 1e-3, 1e-9]), rtol=1e-4)) == 3
    assert int(si.numerical_rank(jnp.array([5.0, 1.0, 1e-3]), rtol=0.0, atol=0.5)) == 2


def test_rounding_noise_does_not_count_as_rank():
    """A rank-2 increment added to a large float32 matrix: W' − W carries rounding noise at eps·|W|,
    which must not inflate the rank or effective rank."""
    w = 30.0 * RNG.normal(size=(64, 64))
    d = 1e-3 * orth(64, 2, 5) @ orth(64, 2, 6).T
    out = jax.device_get(sp.matrix_spectra(f32(w), f32(w) + f32(d), k=2))
    assert int(out["delta_rank"]) == 2
    assert float(out["delta_erank"]) == pytest.approx(2.0, rel=1e-2)


def test_top_k_subspace_rotation_is_measured_on_the_right_side():
    """Rotate the 2nd left singular vector towards the 5th by θ: top-3 left subspaces differ by
    exactly one angle θ; the right subspaces are unchanged."""
    m, n, k, theta = 20, 30, 3, 0.4
    u, v = orth(m, m, 7), orth(n, m, 8)
    s = np.linspace(10.0, 1.0, m)
    u2 = u.copy()
    u2[:, 1] = math.cos(theta) * u[:, 1] + math.sin(theta) * u[:, 4]
    u2[:, 4] = -math.sin(theta) * u[:, 1] + math.cos(theta) * u[:, 4]
    out = jax.device_get(sp.matrix_spectra(f32((u * s) @ v.T), f32((u2 * s) @ v.T), k=k))
    np.testing.assert_allclose(out["angles_left"], [0.0, 0.0, theta], atol=1e-3)
    np.testing.assert_allclose(out["angles_right"], 0.0, atol=1e-3)
    np.testing.assert_allclose(out["overlap_left"], (2 + math.cos(theta) ** 2) / 3, atol=1e-5)


def test_batched_equals_single():
    w = RNG.normal(size=(3, 12, 20))
    w2 = w + 0.1 * RNG.normal(size=(3, 12, 20))
    batched = jax.device_get(sp.matrix_spectra(f32(w), f32(w2), k=4))
    for b in range(3):
        one = jax.device_get(sp.matrix_spectra(f32(w[b]), f32(w2[b]), k=4))
        for key in one:
            np.testing.assert_allclose(batched[key][b], one[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_matrix_spectra_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        sp.matrix_spectra(jnp.zeros((4, 5)), jnp.zeros((5, 4)))
    with pytest.raises(ValueError, match="k=9"):
        sp.matrix_spectra(jnp.zeros((4, 8)), jnp.zeros((4, 8)), k=9)


# --- principal angles and φ ----------------------------------------------------------------------
def test_principal_angles_known():
    theta = np.array([1e-3, 0.3, 1.0, np.pi / 2])
    q = orth(20, 8, 9)
    a = q[:, :4]
    b = np.cos(theta) * q[:, :4] + np.sin(theta) * q[:, 4:8]
    got = np.asarray(si.principal_angles(f32(a), f32(b)))
    np.testing.assert_allclose(got, theta, atol=2e-5)  # small angles accurate (sine branch)
    # invariant to the choice of basis inside each subspace, and symmetric
    rot = orth(4, 4, 10)
    np.testing.assert_allclose(si.principal_angles(f32(a @ rot), f32(b)), theta, atol=2e-5)
    np.testing.assert_allclose(si.principal_angles(f32(b), f32(a)), theta, atol=2e-5)
    # different dimensions: a 2-d subspace inside a 4-d one has two zero angles
    np.testing.assert_allclose(si.principal_angles(f32(a), f32(a[:, :2] @ orth(2, 2, 11))), 0.0, atol=1e-3)
    with pytest.raises(ValueError, match="different spaces"):
        si.principal_angles(jnp.zeros((5, 2)), jnp.zeros((6, 2)))


def test_phi_identical_orthogonal_partial():
    q = orth(30, 10, 12)
    dec = np.array([5.0, 4.0, 3.0, 2.0])
    a = (q[:, 0:4] * dec) @ orth(6, 4, 13).T   # left subspace q0..q3, ordered
    b = (q[:, 2:6] * dec) @ orth(6, 4, 14).T   # left subspace q2..q5, top vector q2
    c = (q[:, 6:10] * dec) @ orth(6, 4, 15).T  # orthogonal to a
    grid = np.asarray(si.phi_grid(f32(a), f32(a), [1, 2, 3, 4], [1, 2, 3, 4]))
    np.testing.assert_allclose(grid, 1.0, atol=1e-5)
    np.testing.assert_allclose(si.phi_grid(f32(a), f32(c), [1, 2, 4], [1, 4]), 0.0, atol=1e-6)
    assert float(si.phi(f32(a), f32(b), 4, 4)) == pytest.approx(0.5, abs=1e-5)
    assert float(si.phi(f32(a), f32(b), 1, 1)) == pytest.approx(0.0, abs=1e-6)
    assert float(si.phi(f32(a), f32(b), 3, 1)) == pytest.approx(1.0, abs=1e-5)  # q2 ∈ span(q0,q1,q2)
    assert float(si.phi(f32(a), f32(b), 4, 2)) == pytest.approx(1.0, abs=1e-5)  # q2,q3 ⊂ span(a)
    # right side: the row spaces
    assert float(si.phi(f32(a.T), f32(a.T), 2, 3, side="right")) == pytest.approx(1.0, abs=1e-5)


def test_phi_matches_a_float64_reference_on_random_matrices():
    a, b = RNG.normal(size=(16, 24)), RNG.normal(size=(16, 24))
    ua, ub = np.linalg.svd(a)[0], np.linalg.svd(b)[0]
    iv, jv = [1, 3, 8, 16], [2, 5, 16]
    ref = np.array([[np.linalg.norm(ua[:, :i].T @ ub[:, :j]) ** 2 / min(i, j) for j in jv] for i in iv])
    np.testing.assert_allclose(si.phi_grid(f32(a), f32(b), iv, jv), ref, atol=1e-4)
    # φ(i, j) with j = full dimension is 1: the whole space contains everything
    np.testing.assert_allclose(ref[:, -1], 1.0, atol=1e-6)


def test_phi_is_nan_beyond_the_numerical_rank_and_checks_ranges():
    a = orth(12, 2, 16) @ orth(8, 2, 17).T * np.array([1.0])  # rank 2
    g = np.asarray(si.phi_grid(f32(a), f32(a), [1, 2, 3], [2]))
    assert np.all(np.isfinite(g[:2])) and np.isnan(g[2, 0])
    with pytest.raises(ValueError, match="between 1 and 8"):
        si.phi_grid(f32(a), f32(a), [9], [1])
    with pytest.raises(ValueError, match="side must be"):
        si.phi(f32(a), f32(a), 1, 1, side="up")


# --- trees: compare / spectral_lens / adapter_similarity -----------------------------------------
def test_compare_locates_a_known_increment_and_handles_tall_matrices(params):
    """fc2 is (M, D) (tall): compare transposes it internally; results must equal the direct
    statistics of the (M, D) matrix, with left = input space."""
    r = 3
    m_, d_ = CFG.mlp_dim, CFG.hidden_size
    delta = (orth(m_, r, 18) * np.array([2.0, 1.0, 0.5])) @ orth(d_, r, 19).T
    path = f"{layers.module_path(1, 'fc2')}/kernel"
    adapted = paths.replace(params, {path: np.asarray(paths.get(params, path)) + delta.astype(np.float32)})
    spectra = sp.compare(params, adapted, k=4)
    assert list(spectra) == list(layers.MODULES)
    fc2 = spectra["fc2"]
    assert fc2.shape == (m_, d_) and fc2.blocks == (0, 1)
    direct = jax.device_get(sp.matrix_spectra(f32(paths.get(params, path)), f32(paths.get(adapted, path)), k=4))
    for key in ("s_base", "delta_s", "delta_rank", "angles_left", "angles_right", "overlap_left"):
        np.testing.assert_allclose(fc2.stats[key][1], direct[key], rtol=1e-4, atol=1e-4, err_msg=key)
    assert int(fc2.delta_rank[1]) == r and int(fc2.delta_rank[0]) == 0
    for m in ("q", "k", "v", "o", "fc1"):
        assert np.all(spectra[m].delta_fro == 0.0)
    rows = sp.table(spectra)
    assert len(rows) == 12 and {r_["module"] for r_ in rows} == set(layers.MODULES)
    with pytest.raises(ValueError, match="blocks"):
        sp.compare(params, adapted, blocks=[5])
    with pytest.raises(ValueError, match="unknown module"):
        sp.compare(params, adapted, modules=["qkv"])


def test_spectral_lens_lora_rank_and_untouched_modules(params):
    lora = method_or_skip("lora", rank=2)
    adapter = perturbed(lora, params, 1)
    spectra = sp.spectral_lens(params, lora, adapter, k=2)
    eff = lora.apply(params, adapter)
    touched = {m for m in layers.MODULES
               if not np.array_equal(paths.get(eff, f"{layers.module_path(0, m)}/kernel"),
                                     paths.get(params, f"{layers.module_path(0, m)}/kernel"))}
    assert touched  # LoRA adapts something
    for m, s in spectra.items():
        if m in touched:
            assert np.all(s.delta_rank == 2) and np.all(s.delta_erank <= 2.0 + 1e-4)
        else:
            assert np.all(s.delta_rank == 0)
    changes = sp.leaf_changes(params, eff)
    assert all(p.endswith("kernel") for p in changes)


def test_adapter_similarity_between_runs(params):
    lora = method_or_skip("lora", rank=2)
    a1, a2 = perturbed(lora, params, 1), perturbed(lora, params, 2)
    same = si.adapter_similarity(params, (lora, a1), (lora, a1), i_values=(1, 2))
    other = si.adapter_similarity(params, (lora, a1), lora.apply(params, a2), i_values=(1, 2), j_values=(2,))
    for m in layers.MODULES:
        if np.all(np.isnan(same[m])):  # a module LoRA leaves alone
            continue
        np.testing.assert_allclose(same[m], 1.0, atol=1e-4)
        assert other[m].shape == (2, 2, 1) and np.all((other[m] >= -1e-6) & (other[m] <= 1 + 1e-6))
    assert any(np.all(np.isnan(v)) for v in same.values()) or len(same) == 6
    with pytest.raises(TypeError, match="pair or a merged"):
        si.adapter_similarity(params, [lora, a1], (lora, a1))


# --- arithmetic ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,hp", [("bitfit", {}), ("ssf", {}), ("full", {}), ("linear", {})])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.7, -0.4)])
def test_leaf_space_equals_delta_space_for_affine_methods(params, name, hp, weights):
    method = method_or_skip(name, **hp)
    a1, a2 = perturbed(method, params, 1), perturbed(method, params, 2)
    bank = ar.AdapterBank(params).add("a", method, a1).add("b", method, a2)
    w = {"a": weights[0], "b": weights[1]}
    delta_tree = bank.combine(w, space="delta")
    m, adapter, head = bank.combine(w, space="leaves")
    assert m == method
    leaf_tree = {**ar.merge(params, m, adapter), "head": head}
    assert tree_max_diff(leaf_tree, delta_tree) < 1e-5
    # and the delta space is literally base + Σ w τ
    tv = [ar.task_vector(params, method, a) for a in (a1, a2)]
    expect = ar.apply_delta(params, jax.tree_util.tree_map(lambda x, y: weights[0] * x + weights[1] * y, *tv))
    assert tree_max_diff(expect, delta_tree) < 1e-5


def test_delta_space_lora_is_the_sum_of_products(params):
    lora = method_or_skip("lora", rank=2)
    a1, a2 = perturbed(lora, params, 1), perturbed(lora, params, 2)
    bank = ar.AdapterBank(params).add("a", lora, a1).add("b", lora, a2)
    got = bank.combine({"a": 0.3, "b": 1.2})
    e1, e2 = lora.apply(params, a1), lora.apply(params, a2)
    expect = jax.tree_util.tree_map(lambda p, x, y: p + 0.3 * (x - p) + 1.2 * (y - p), dict(params), e1, e2)
    assert tree_max_diff(got, expect) < 1e-5
    # ... which differs from naively averaging the factors
    naive = jax.tree_util.tree_map(lambda x, y: 0.5 * x + 0.5 * y, a1, a2)
    half = bank.combine({"a": 0.5, "b": 0.5})
    assert tree_max_diff(lora.apply(params, naive), half) > 1e-4


@pytest.mark.parametrize("name", ["lora", "fact_tt", "fact_tk", "efft", "rlrr"])
def test_leaf_space_refused_for_multilinear_methods(params, name):
    method = method_or_skip(name)
    a1, a2 = perturbed(method, params, 1), perturbed(method, params, 2)
    bank = ar.AdapterBank(params).add("a", method, a1).add("b", method, a2)
    with pytest.raises(ValueError, match="not defined for .*delta"):
        bank.combine({"a": 0.5, "b": 0.5}, space="leaves")
    out = bank.combine({"a": 0.5, "b": 0.5}, space="delta")  # always defined
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(dict(params))


def test_arithmetic_errors_and_immutability(params):
    bitfit = method_or_skip("bitfit")
    a1 = perturbed(bitfit, params, 1)
    bank0 = ar.AdapterBank(params)
    bank = bank0.add("a", bitfit, a1)
    assert len(bank0) == 0 and bank.names == ("a",)
    with pytest.raises(TypeError):
        bank.entries["b"] = None  # read-only mapping
    with pytest.raises(ValueError, match="already"):
        bank.add("a", bitfit, a1)
    with pytest.raises(KeyError, match="no adapter named"):
        bank.combine({"zzz": 1.0})
    assert bank.remove("a").names == ()
    with pytest.raises(ValueError, match="does not fit"):
        bank.add("bad", bitfit, {"nope": {"bias": np.zeros(3)}})
    # different hyper-parameters -> no leaf-space combination
    other = method_or_skip("bitfit", targets=r"LayerNorm_0/bias$")
    b2 = bank.add("b", other, other.init(jax.random.PRNGKey(0), params))
    with pytest.raises(ValueError, match="equal hyper-parameters"):
        b2.combine({"a": 0.5, "b": 0.5}, space="leaves")
    assert tree_max_diff(b2.combine({"a": 1.0, "b": 0.0}), {**bitfit.apply(params, a1)}) < 1e-6
    with pytest.raises(ValueError, match="weights"):
        ar.combine_deltas(params, [{}], [1.0, 2.0])
    with pytest.raises(ValueError, match="different leaves"):
        ar.combine_adapters(params, bitfit, [a1, {"embedding": {"bias": np.zeros(CFG.hidden_size)}}], [0.5, 0.5])
    with pytest.raises(ValueError, match="unknown space"):
        bank.combine({"a": 1.0}, space="factors")


def test_heads_in_bank_and_combination(params):
    bitfit = method_or_skip("bitfit")
    h1 = {"kernel": np.ones((CFG.hidden_size, 5), np.float32), "bias": np.ones(5, np.float32)}
    h2 = {"kernel": 3 * np.ones((CFG.hidden_size, 5), np.float32), "bias": np.zeros(5, np.float32)}
    bank = (ar.AdapterBank(params).add("a", bitfit, perturbed(bitfit, params, 1), head=h1)
            .add("b", bitfit, perturbed(bitfit, params, 2), head=h2))
    np.testing.assert_array_equal(bank.effective("a")["head"]["kernel"], h1["kernel"])
    assert tree_max_diff(bank.combine({"a": 0.5, "b": 0.5})["head"], params["head"]) == 0.0
    assert tree_max_diff(bank.combine({"a": 0.5, "b": 0.5}, head="b")["head"], h2) == 0.0
    mixed = bank.combine({"a": 0.25, "b": 0.75}, include_head=True)["head"]
    np.testing.assert_allclose(mixed["kernel"], 0.25 * h1["kernel"] + 0.75 * h2["kernel"]
                               + (1 - 1.0) * params["head"]["kernel"], atol=1e-6)
    with pytest.raises(ValueError, match="head of"):
        bank.add("c", bitfit, perturbed(bitfit, params, 3), head={"w": 1})


# --- swapping ------------------------------------------------------------------------------------
def test_swapping_adapters_and_heads_does_not_recompile(params):
    lora = method_or_skip("lora", rank=2)
    model = vit.ViT(CFG)
    fwd = SwappableForward(model, lora)
    x = jnp.asarray(RNG.uniform(-1, 1, size=(2, 16, 16, 3)), jnp.float32)
    adapters = [perturbed(lora, params, s) for s in (1, 2, 3)]
    heads = [params] + [{**params, "head": jax.tree_util.tree_map(lambda h, s=s: h + s, params["head"])}
                        for s in (1.0, 2.0)]
    outs = [fwd(p, a, x) for p, a in zip(heads, adapters)]
    assert fwd.num_compilations == 1 and fwd.num_traces == 1
    for p, a, o in zip(heads, adapters, outs):
        ref = model.apply({"params": lora.apply(p, a)}, x, train=False)
        np.testing.assert_allclose(o, ref, atol=1e-5)
    assert not np.allclose(outs[0], outs[1])
    stacked = fwd.stacked(params, adapters, x)
    assert stacked.shape == (3, 2, CFG.num_classes)
    np.testing.assert_allclose(stacked[0], outs[0], atol=1e-5)
    # another structure (a different rank) is a new program
    lora4 = method_or_skip("lora", rank=4)
    fwd4 = SwappableForward(model, lora4)
    fwd4(params, perturbed(lora4, params, 1), x)
    with pytest.raises(ValueError, match="expects adapter leaves that match"):  # checked since #15
        fwd(params, perturbed(lora4, params, 1), x)  # rank-4 leaves through the rank-2 method: refused
    bank = ar.AdapterBank(params).add("a", lora, adapters[0])
    np.testing.assert_allclose(fwd.run(bank, "a", x), outs[0], atol=1e-5)
    with pytest.raises(ValueError, match="one SwappableForward per method"):
        fwd4.run(bank, "a", x)


# --- plots and report ----------------------------------------------------------------------------
def _spectra(params):
    path = f"{layers.module_path(0, 'q')}/kernel"
    q = np.asarray(paths.get(params, path))
    adapted = paths.replace(params, {path: q + 0.1 * np.ones_like(q)})
    return sp.compare(params, adapted, k=2)


def test_plots_write_pngs(params, tmp_path):
    pytest.importorskip("matplotlib")
    from jax_peft.analysis import plots

    spectra = _spectra(params)
    files = [plots.heatmap(spectra, tmp_path / "h.png"),
             plots.heatmap(spectra, tmp_path / "e.png", value="delta_erank"),
             plots.spectrum(spectra, "q", 0, tmp_path / "s.png"),
             plots.similarity_grid(np.array([[1.0, np.nan], [0.5, 0.2]]), [1, 2], [1, 4], tmp_path / "g.png")]
    for f in files:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    grid, modules, blocks = plots.heatmap_values(spectra, "delta_fro")
    assert grid.shape == (2, 6) and grid[0, 0] > 0 and grid[1, 0] == 0
    with pytest.raises(ValueError, match="unknown value"):
        plots.heatmap(spectra, tmp_path / "x.png", value="nope")


def test_plots_without_matplotlib_say_how_to_install(monkeypatch, params, tmp_path):
    import sys

    from jax_peft.analysis import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"jax-peft\[plot\]"):
        plots.heatmap(_spectra(params), tmp_path / "h.png")


def test_report_cli_on_a_training_checkpoint_and_on_npz(tmp_path, caplog):
    """A checkpoint laid out as training writes it; the loader must rebuild the exact base that
    `loop.setup` trains on (random init from the run's seed) and restore adapter and head."""

    from jax_peft.analysis import __main__ as cli
    from jax_peft.train import checkpointing, loop

    lora = method_or_skip("lora", rank=2)
    from jax_peft.configs import smoke

    c = smoke.get_config("lora")
    c.method.rank = 2
    s = loop.setup(c)
    assert s.method == lora
    base = s.params
    adapter = jax.tree_util.tree_map(np.asarray, perturbed(lora, base, 1))
    head = jax.tree_util.tree_map(lambda h: np.asarray(h) + 0.5, base["head"])
    state = {"step": jnp.asarray(7, jnp.int32), "trainable": {"adapter": adapter, "head": head}, "opt_state": {}}
    ck = checkpointing.Checkpointer(str(tmp_path / "run" / "checkpoints"), config=checkpointing.config_to_json(c))
    ck.save(state, data_position=7)
    ck.close()

    import logging

    with caplog.at_level(logging.WARNING):
        params, method, restored, info = cli.load_run(str(tmp_path / "run"))
    assert "read only" not in caplog.text  # orbax's warning about the manager we opened read-only
    assert method == lora and info["step"] == 7
    assert tree_max_diff(restored, adapter) == 0.0
    assert tree_max_diff(params, {**base, "head": head}) == 0.0

    path = cli.main([str(tmp_path / "run"), "--k", "2", "--no-plots"])
    text = open(path).read()
    assert path == str(tmp_path / "run" / "analysis" / "report.md")
    assert "## Per module" in text and "| q |" in text and "Trainable adapter parameters" in text
    data = np.load(tmp_path / "run" / "analysis" / "spectra.npz")
    assert data["q/delta_rank"].shape == (2,)

    # the .npz alternative: base + merged checkpoints
    from jax_peft.checkpoint import save_checkpoint
    from jax_peft.merge import merge

    save_checkpoint(tmp_path / "base.npz", base)
    save_checkpoint(tmp_path / "merged.npz", merge({**base, "head": head}, lora, adapter))
    path2 = cli.main(["--base", str(tmp_path / "base.npz"), "--merged", str(tmp_path / "merged.npz"),
                      "--out", str(tmp_path / "r2"), "--k", "2", "--no-plots"])
    text2 = open(path2).read()
    row = lambda t: [ln for ln in t.splitlines() if ln.startswith("| 0 | v |")]
    assert row(text) == row(text2)
    with pytest.raises(SystemExit):
        cli.main(["--base", str(tmp_path / "base.npz")])
    with pytest.raises(FileNotFoundError, match="no orbax checkpoint"):
        cli.load_run(str(tmp_path / "empty_dir_that_is_missing"))


def test_k0_gives_values_without_angles():
    w = RNG.normal(size=(2, 10, 14))
    d = np.stack([orth(10, 2, 20) @ orth(14, 2, 21).T] * 2)
    full = jax.device_get(sp.matrix_spectra(f32(w), f32(w + d), k=3))
    cheap = jax.device_get(sp.matrix_spectra(f32(w), f32(w + d), k=0))
    for key in ("s_base", "s_adapted", "delta_s", "delta_rank", "delta_erank", "delta_fro"):
        np.testing.assert_allclose(cheap[key], full[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert cheap["angles_left"].shape == (2, 0) and np.all(np.isnan(cheap["overlap_left"]))
    rows = sp.ModuleSpectra("q", (10, 14), 0, (0, 1), {k: np.asarray(v) for k, v in cheap.items()}).rows()
    assert math.isnan(rows[0]["max_angle_left_deg"]) and rows[0]["delta_rank"] == 2


def test_report_with_figures(params, tmp_path):
    pytest.importorskip("matplotlib")
    import re

    from jax_peft.analysis import report

    bitfit = method_or_skip("bitfit")
    path = report(params, bitfit, perturbed(bitfit, params, 1), str(tmp_path / "rep"), k=2)
    text = open(path).read()
    figs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert figs and all((tmp_path / "rep" / f).is_file() for f in figs)
    # BitFit changes no matrix: the report says so and lists the biases instead
    assert "Adapted matrices: 0 of 12" in text and "MlpBlock_0/Dense_0/bias" in text


def test_unchanged_fast_path_matches_the_full_computation():
    w = f32(RNG.normal(size=(3, 12, 20)))
    for k in (0, 4):
        full = jax.device_get(sp.matrix_spectra(w, w, k=k))
        fast = jax.device_get(sp._unchanged_spectra(w, k=k))
        assert set(full) == set(fast)
        for key in full:
            assert fast[key].shape == full[key].shape and fast[key].dtype == full[key].dtype, key
            np.testing.assert_allclose(fast[key], full[key], atol=2e-3, err_msg=key)
