"""Method behaviours pinned through the public API only (`get_method`, `method.init/apply`,
`jax_peft.merge`, `methods.activation.forward`): EFFT's factor-dropout masks, LoRA's alpha / rank
scale, where the side paths drop activations, and the precision of `merge`.

Each test reads an observable output (effective kernels, logits, adapter gradients), so it holds
whatever the methods' internals look like.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, tiny_vit_config

import jax_peft
from jax_peft import paths
from jax_peft.methods.activation import forward

KEY = jax.random.PRNGKey(0)
ATTN = "MultiHeadDotProductAttention_0"
KERNEL = {"q": f"{ATTN}/query", "k": f"{ATTN}/key", "v": f"{ATTN}/value", "o": f"{ATTN}/out",
          "fc1": "MlpBlock_0/Dense_0", "fc2": "MlpBlock_0/Dense_1"}


def _kernel(params, block: int, module: str) -> np.ndarray:
    """Block `block`'s `module` kernel as an (in, out) matrix (numpy float64)."""
    k = np.asarray(paths.flatten(params)[f"Transformer/encoderblock_{block}/{KERNEL[module]}/kernel"], np.float64)
    return k.reshape(-1, k.shape[-1]) if module == "o" else k.reshape(k.shape[0], -1)


def _random_adapter(method, params, seed: int, low: float = -1.0, high: float = 1.0):
    """An adapter of `method.init`'s structure with every leaf uniform in [low, high) (official inits
    zero one factor). Shapes come from `jax.eval_shape`; values from numpy (no compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: rng.uniform(low, high, x.shape).astype(np.float32),
                                  jax.eval_shape(method.init, KEY, params))


def _images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


# --- 1. EFFT: independent factor-dropout masks per factor, site and block ---------------------------

def test_efft_factor_dropout_masks_are_independent_per_factor_site_and_block():
    """Rank 1 makes every increment an outer product s·(u ⊙ m_u/keep) (c m_c/keep) (v ⊙ m_v/keep), so
    the kept rows / columns of ΔK are the masks of u and v. The official forward draws 9 masks per
    block: u1, c1, v1 shared by q, k, v, o; u2, c2[..., 0], v2 for fc1; fresh ones for fc2."""
    cfg = tiny_vit_config()  # 2 blocks, width 32, MLP 64
    params = random_params(cfg, 0)
    rate, s = 0.5, 1.5
    method = jax_peft.get_method("efft", rank=1, scale=s, dropout=rate)
    adapter = _random_adapter(method, params, 1, 0.5, 1.5)  # no zero entries
    apply = jax.jit(lambda key: method.apply(params, adapter, rng=key))
    a = {k: v.astype(np.float64) for k, v in adapter.items()}
    full = {}  # the increments without dropout (the same in every block of the shared variant)
    for i in range(2):
        full.update({(i, m): s * a["u1"] @ a["c1"][:, :, j] @ a["v1"] for j, m in enumerate(("q", "k", "v", "o"))})
        full[(i, "fc1")] = s * a["u2"] @ a["c2"][:, :, 0] @ a["v2"]
        full[(i, "fc2")] = (s * a["u2"] @ a["c2"][:, :, 1] @ a["v2"]).T
    compared = {"shared": 0, "fc1-attn": 0, "fc2-fc1": 0, "blocks": 0}
    for seed in range(10):
        eff = apply(jax.random.PRNGKey(seed))
        delta = {(i, m): _kernel(eff, i, m) - _kernel(params, i, m) for i in range(2) for m in KERNEL}
        u, v = {}, {}  # masks of the (in-side, out-side) factors of every site whose core was kept
        for (i, m), d in delta.items():
            kept = d != 0
            if not kept.any():  # the site's core entry was dropped
                continue
            rows, cols = kept.any(axis=1), kept.any(axis=0)
            # inverted dropout on each of the three factors: kept entries are the full increment / keep³
            np.testing.assert_allclose(d[kept], full[(i, m)][kept] / (1 - rate) ** 3, rtol=2e-5)
            assert np.array_equal(kept, np.outer(rows, cols)), (i, m)
            u[(i, m)], v[(i, m)] = (cols, rows) if m == "fc2" else (rows, cols)  # fc2 is transposed
        for i in range(2):
            attn = [u[(i, m)] for m in ("q", "k", "v", "o") if (i, m) in u]
            for a in attn[1:]:  # one u1 mask (and one v1 mask) for q, k, v and o
                assert np.array_equal(a, attn[0])
                compared["shared"] += 1
            if attn and (i, "fc1") in u:
                assert not np.array_equal(u[(i, "fc1")], attn[0]), "fc1 reuses the attention factors' mask"
                compared["fc1-attn"] += 1
            if (i, "fc1") in u and (i, "fc2") in u:
                assert not np.array_equal(u[(i, "fc2")], u[(i, "fc1")]), "fc2 reuses fc1's u2 mask"
                assert not np.array_equal(v[(i, "fc2")], v[(i, "fc1")]), "fc2 reuses fc1's v2 mask"
                compared["fc2-fc1"] += 1
        for m in KERNEL:
            if (0, m) in u and (1, m) in u:
                assert not np.array_equal(u[(0, m)], u[(1, m)]), f"blocks 0 and 1 share the {m} mask"
                compared["blocks"] += 1
    assert min(compared.values()) >= 3, compared  # every comparison really happened


# --- 2. LoRA's alpha / rank scale on the separate (q, v) variant ------------------------------------

def test_lora_separate_qv_scale_alpha_over_rank_in_every_form():
    """ΔK = (alpha / rank) · A B on q and v (alpha ≠ rank), checked against kernels built here in
    numpy: weight form, merge, and the activation form in eval and in train mode (dropout 0)."""
    cfg = tiny_vit_config()
    params = random_params(cfg, 0)
    method = jax_peft.get_method("lora", rank=2, alpha=6.0, dropout=0.0)  # targets q, v; s = 3
    adapter = _random_adapter(method, params, 2)
    flat_ad, flat_p = paths.flatten(adapter), paths.flatten(params)
    want = dict(flat_p)
    for i in range(cfg.num_layers):
        for m in ("q", "v"):
            node = f"Transformer/encoderblock_{i}/{KERNEL[m]}"
            k = flat_p[f"{node}/kernel"]
            delta = 3.0 * flat_ad[f"{node}/lora_a"].astype(np.float64) @ flat_ad[f"{node}/lora_b"]
            want[f"{node}/kernel"] = (k.reshape(k.shape[0], -1) + delta).reshape(k.shape).astype(np.float32)
    want = paths.unflatten(want)

    for got in (method.apply(params, adapter), jax_peft.merge(params, method, adapter)):
        got = paths.flatten(got)
        assert set(got) == set(flat_p)
        for p, w in paths.flatten(want).items():
            np.testing.assert_allclose(np.asarray(got[p]), w, rtol=1e-6, atol=1e-6, err_msg=p)

    model = jax_peft.ViT(cfg)
    x = _images(2, 32, 1)
    ref = model.apply({"params": want}, x)
    assert float(jnp.abs(ref - model.apply({"params": params}, x)).max()) > 1e-2  # the increment matters
    eval_act = forward(model, method, params, adapter, x, form="activation")
    train_act = forward(model, method, params, adapter, x, train=True, rng=KEY, form="activation")
    np.testing.assert_allclose(eval_act, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(train_act, ref, rtol=1e-5, atol=1e-5)


# --- 3. where the side paths drop activations -----------------------------------------------------

def _one_token_model():
    """One block whose input is a single token (global pooling over one 8x8 patch): the gradient of
    a factor is then an outer product over that token, so a dropout mask shows up entry by entry."""
    cfg = tiny_vit_config(num_layers=1, image_size=8, classifier="gap")
    return cfg, random_params(cfg, 3), _images(1, 8, 4)


def _train_eval_grad_ratios(cfg, method, params, adapter, x, leaf_paths, num_keys=6):
    """{path: [train-mode gradient / eval-mode gradient for each key]} of the chosen adapter leaves.
    The adapters used here give side outputs of zero, so the gradient reaching each side path is the
    same in both modes and the ratio is the dropout mask / keep at the factor's position."""
    model = jax_peft.ViT(cfg)
    w = np.random.default_rng(5).standard_normal((1, cfg.num_classes)).astype(np.float32)

    def grad(key, train):
        loss = lambda a: jnp.sum(w * forward(model, method, params, a, x, train=train, rng=key))
        return paths.flatten(jax.grad(loss)(adapter))

    ev, tr = jax.jit(lambda keys: (grad(None, False), jax.vmap(lambda k: grad(k, True))(keys)))(
        jnp.stack([jax.random.PRNGKey(i) for i in range(num_keys)]))
    out = {}
    for p in leaf_paths:
        g = np.asarray(ev[p], np.float64)
        assert np.all(np.abs(g) > 1e-6 * np.abs(g).max()), p  # ratios defined everywhere
        out[p] = [np.asarray(t, np.float64) / g for t in np.asarray(tr[p])]
    return out


def _assert_mask_ratios(ratios, keep, axis):
    """Every ratio slice along `axis` is constant, 0 or 1/keep; both values occur."""
    seen = set()
    for r in ratios:
        lines = np.moveaxis(r, axis, -1).reshape(-1, r.shape[axis])
        for line in lines:
            value = 0.0 if np.allclose(line, 0.0, atol=1e-5) else 1 / keep
            np.testing.assert_allclose(line, value, rtol=1e-4, atol=1e-5)
            seen.add(value)
    assert seen == {0.0, 1 / keep}, seen


def test_lora_dropout_acts_on_the_input_of_the_side_path():
    """`x K + drop(x) A (s B)`: with A = 0 the side output is zero and dL/dA = drop(x)ᵀ (G (s B)ᵀ), so
    each row of the train/eval gradient ratio is one input feature's mask value (0 or 1/keep).
    (With one token, q and k get no gradient: v, o, fc1 and fc2 are checked.)"""
    cfg, params, x = _one_token_model()
    keep = 0.5
    method = jax_peft.get_method("lora", rank=3, alpha=6.0, dropout=1 - keep, targets=("v", "o", "fc1", "fc2"))
    adapter = paths.unflatten({p: (np.zeros_like(v) if p.endswith("lora_a") else v)
                               for p, v in paths.flatten(_random_adapter(method, params, 6)).items()})
    a_paths = [p for p in paths.flatten(adapter) if p.endswith("lora_a")]
    assert len(a_paths) == 4
    ratios = _train_eval_grad_ratios(cfg, method, params, adapter, x, a_paths)
    for p in a_paths:
        _assert_mask_ratios(ratios[p], keep, axis=1)  # A (in, r): one mask value per input feature (row)


def test_fact_dropout_acts_on_the_rank_r_activation_after_the_core():
    """`x K + s · drop(x U T) V`: with every core T = 0 the side outputs are zero and
    dL/dT = (x U)ᵀ drop'(G Vᵀ), so each column of the train/eval gradient ratio of a core is one mask
    value (0 or 1/keep) of the activation after the core. (One token: q and k get no gradient.)"""
    cfg, params, x = _one_token_model()
    keep = 0.5
    method = jax_peft.get_method("fact_tt", rank=3, scale=2.0, dropout=1 - keep)
    adapter = _random_adapter(method, params, 7)
    adapter = {k: (v if k in ("U", "V") else np.zeros_like(v)) for k, v in adapter.items()}
    cores = ["v", "o", "fc1", "fc2"]
    ratios = _train_eval_grad_ratios(cfg, method, params, adapter, x, cores)
    for m in cores:
        _assert_mask_ratios(ratios[m], keep, axis=1)  # core (L, r_in, r_out): one mask value per column


# --- 4. merge precision ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lora", "fact_tt", "rlrr"])
def test_merge_of_bfloat16_leaves_equals_the_float32_merge_of_the_same_values(name):
    """The increments are formed in (at least) float32: merging (and applying) bfloat16 params and
    adapter gives the float32 result for the same values, rounded (at most) once to the result's dtype."""
    cfg = tiny_vit_config()
    params = random_params(cfg, 0)
    method = jax_peft.get_method(name)
    bf16 = lambda t: jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.bfloat16), t)
    f32 = lambda t: jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), t)
    params16, adapter16 = bf16(params), bf16(_random_adapter(method, params, 3, 0.5, 1.5))
    base = paths.flatten(params16)
    merged = (jax_peft.merge(params16, method, adapter16), jax_peft.merge(f32(params16), method, f32(adapter16)))
    applied = (method.apply(params16, adapter16), method.apply(f32(params16), f32(adapter16)))
    for got, ref in (merged, applied):
        got, ref = paths.flatten(got), paths.flatten(ref)
        changed = 0
        for p, r in ref.items():
            g = got[p]
            assert g.dtype in (jnp.float32, jnp.bfloat16), (p, g.dtype)
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(jnp.asarray(r, g.dtype), np.float32),
                                          err_msg=p)
            changed += not np.array_equal(np.asarray(g, np.float32), np.asarray(base[p], np.float32))
        assert changed > 0


@pytest.mark.parametrize("name", ["fact_tt", "efft", "bitfit"])
def test_merge_keeps_float64_under_x64(name):
    """Under jax_enable_x64 a float64 tree merges in float64 (no rounding through float32), checked
    against float64 references built here."""
    cfg = tiny_vit_config()
    params = random_params(cfg, 0)
    method = jax_peft.get_method(name)
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        p64 = jax.tree_util.tree_map(lambda v: v.astype(np.float64) + 1e-3 * rng.standard_normal(v.shape), params)
        ad = jax.tree_util.tree_map(lambda v: v.astype(np.float64) + 0.2 * rng.standard_normal(v.shape),
                                    _random_adapter(method, params, 8, 0.5, 1.5))
        merged = jax_peft.merge(p64, method, ad)
    flat = paths.flatten(merged)
    assert {str(v.dtype) for v in flat.values()} == {"float64"}
    base = paths.flatten(p64)
    if name == "bitfit":  # the adapter holds the new biases themselves
        want = {**base, **paths.flatten(ad)}
    else:  # block 1's q and fc2 kernels: K + s · U T V (FacT-TT), K + s · u1 c1_q v1 and K + s · (u2 c2_1 v2)ᵀ (EFFT)
        s = method.scale
        dq, d2 = ((ad["U"] @ ad["q"][1] @ ad["V"], None) if name == "fact_tt" else
                  (ad["u1"] @ ad["c1"][:, :, 0] @ ad["v1"], (ad["u2"] @ ad["c2"][:, :, 1] @ ad["v2"]).T))
        want = {f"Transformer/encoderblock_1/{KERNEL['q']}/kernel": _kernel(p64, 1, "q") + s * dq}
        if d2 is not None:
            want[f"Transformer/encoderblock_1/{KERNEL['fc2']}/kernel"] = _kernel(p64, 1, "fc2") + s * d2
    for p, w in want.items():
        got = np.asarray(flat[p]).reshape(np.shape(w))
        np.testing.assert_allclose(got, w, rtol=1e-13, atol=1e-14, err_msg=p)
