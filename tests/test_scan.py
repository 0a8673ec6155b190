"""jax_peft.scan: exact conversion between per-block and stacked parameter layouts."""

import jax
import numpy as np
import pytest

from conftest import random_params, tiny_vit_config
from jax_peft import paths
from jax_peft.scan import stack_blocks, unstack_blocks


def test_stack_unstack_roundtrip_is_exact():
    cfg = tiny_vit_config(num_layers=3)
    params = random_params(cfg, seed=1)
    stacked = stack_blocks(params)
    tr = stacked["Transformer"]
    assert "encoderblock" in tr and not any(k.startswith("encoderblock_") for k in tr)
    q = tr["encoderblock"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    assert q.shape == (3,) + params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape
    np.testing.assert_array_equal(q[2], params["Transformer"]["encoderblock_2"]["MultiHeadDotProductAttention_0"]["query"]["kernel"])
    back = unstack_blocks(stacked)
    a, b = paths.flatten(params), paths.flatten(back)
    assert set(a) == set(b)
    for k in a:
        assert np.asarray(b[k]).dtype == np.asarray(a[k]).dtype, k
        np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
    assert paths.count(stacked) == paths.count(params)


def test_stack_errors_are_clear():
    cfg = tiny_vit_config(num_layers=2)
    params = random_params(cfg)
    with pytest.raises(ValueError, match="already stacked"):
        stack_blocks(stack_blocks(params))
    with pytest.raises(ValueError, match="not a stacked tree"):
        unstack_blocks(params)
    broken = jax.tree_util.tree_map(lambda x: x, params)
    del broken["Transformer"]["encoderblock_0"]
    with pytest.raises(ValueError, match="without gaps"):
        stack_blocks(broken)
    odd = jax.tree_util.tree_map(lambda x: x, params)
    odd["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"] = np.ones(7, np.float32)
    with pytest.raises(ValueError, match="leaf shapes"):
        stack_blocks(odd)
