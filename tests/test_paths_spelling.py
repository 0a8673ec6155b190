"""Path selections accept the `.npz` files' names of block children (LayerNorm_2, MlpBlock_3,
MultiHeadDotProductAttention_1) as well as the in-memory tree's (LayerNorm_1, MlpBlock_0, ..._0)."""

import jax
import pytest

import jax_peft
from jax_peft import checkpoint as ck
from jax_peft import paths


def test_file_spelling_selects_the_same_leaves(tiny_params):
    for file_name, tree_name in paths.FILE_TO_TREE_NAMES.items():
        assert paths.select(tiny_params, file_name) == paths.select(tiny_params, tree_name)
    # the file tree really uses the other spelling (what a user sees in inspect_checkpoint)
    file_keys = list(ck.to_pre_linen(tiny_params))
    assert any("MlpBlock_3/" in k for k in file_keys) and not any("MlpBlock_0/" in k for k in file_keys)
    # no broadening: a pattern without a file name matches what it matched before
    assert paths.select(tiny_params, r"encoderblock_0/LayerNorm_0/scale") == [
        "Transformer/encoderblock_0/LayerNorm_0/scale"]
    assert paths.tree_spelling("MlpBlock_31|LayerNorm_2/bias") == "MlpBlock_31|LayerNorm_1/bias"
    with pytest.raises(ValueError, match="selects no parameter"):
        paths.select(tiny_params, "MlpBlock_7")


def test_methods_accept_file_spelling(tiny_params):
    for name, kw in (("rlrr", "targets"), ("bitfit", "targets"), ("lora", "targets")):
        a = jax_peft.get_method(name, **{kw: "MlpBlock_3/Dense_0"})
        b = jax_peft.get_method(name, **{kw: "MlpBlock_0/Dense_0"})
        ta = a.init(jax.random.PRNGKey(0), tiny_params)
        tb = b.init(jax.random.PRNGKey(0), tiny_params)
        assert paths.leaf_paths(ta) == paths.leaf_paths(tb) and paths.count(ta) > 0, name
