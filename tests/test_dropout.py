"""jax_peft.dropout: 16-bit keep masks, two draws per threefry word."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_peft.dropout import inverted_dropout, keep_mask


def test_keep_rate_is_the_requested_one_on_both_halves_of_each_word():
    mask = np.asarray(keep_mask(jax.random.PRNGKey(0), 0.9, (1000, 771)))  # odd width: last word half used
    assert mask.shape == (1000, 771) and mask.dtype == bool
    sd = (0.9 * 0.1 / mask[:, ::2].size) ** 0.5
    for half in (mask[:, ::2], mask[:, 1::2]):  # high and low 16 bits
        assert abs(half.mean() - 0.9) < 5 * sd
    # the two draws from one word are independent (no correlation between neighbours)
    pair = mask[:, 0:770:2] & mask[:, 1:771:2]
    assert abs(pair.mean() - 0.81) < 5 * (0.81 * 0.19 / pair.size) ** 0.5


def test_edges_shapes_and_traced_keep():
    key = jax.random.PRNGKey(1)
    assert bool(keep_mask(key, 1.0, (5, 7)).all()) and not bool(keep_mask(key, 0.0, (5, 7)).any())
    assert keep_mask(key, 0.5, ()).shape == () and keep_mask(key, 0.5, (3, 0)).shape == (3, 0)
    assert keep_mask(key, 0.5, (4, 1)).shape == (4, 1)
    traced = jax.jit(lambda k, keep: keep_mask(k, keep, (64, 32)))(key, jnp.float32(0.75))
    np.testing.assert_array_equal(traced, keep_mask(key, 0.75, (64, 32)))
    with pytest.raises(ValueError, match="outside"):
        keep_mask(key, 1.5, (2,))


def test_inverted_dropout_scales_kept_entries_by_one_over_keep():
    key = jax.random.PRNGKey(2)
    x = jnp.arange(1.0, 129.0).reshape(4, 32)
    y = inverted_dropout(key, x, 0.25)
    mask = keep_mask(key, 0.75, x.shape)
    np.testing.assert_array_equal(y, jnp.where(mask, x / 0.75, 0.0))
    assert inverted_dropout(key, x, 0.0) is x
