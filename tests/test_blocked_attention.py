"""The blocked causal and bidirectional attention against the full-square explicit attention: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.kernels.blocked_attention import bidirectional_attention, causal_attention
from llm_jax.models.layers import causal_segment_mask, xla_attention


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _value_and_grads(attention, q, k, v, cotangent):
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v).astype(jnp.float32) * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("segment_ids, block", [
    # blocks of 4 over 10 rows: 4 + 4 + a ragged 2; documents and padding cross the block edges
    ([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], 4),
    (None, 3),
    (None, 16),  # one block holding everything
])
def test_blocked_attention_matches_full_attention_and_its_gradients(segment_ids, block):
    mask = causal_segment_mask(None if segment_ids is None else jnp.array(segment_ids), LENGTH)
    _assert_blocked_matches_full(causal_attention, mask, block)


LENGTH = 10  # rows of the comparisons with full attention


def _assert_blocked_matches_full(attention, mask, block):
    """`attention(q, k, v, mask, block)` and its gradients against `xla_attention` under `mask`."""
    batch, heads, kv_heads, head_dim = 2, 4, 2, 8
    q = _normal(1, (batch, LENGTH, heads, head_dim))
    k = _normal(2, (batch, LENGTH, kv_heads, head_dim))
    v = _normal(3, (batch, LENGTH, kv_heads, head_dim))
    cotangent = _normal(4, (batch, LENGTH, heads, head_dim))
    value, grads = _value_and_grads(lambda q, k, v: attention(q, k, v, mask, block), q, k, v, cotangent)
    expected_value, expected_grads = _value_and_grads(lambda q, k, v: xla_attention(q, k, v, mask), q, k, v,
                                                      cotangent)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for got, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
    batch, length, heads, head_dim = 2, 12, 2, 8
    q, k, v = (_normal(seed, (batch, length, heads, head_dim), jnp.bfloat16) for seed in (5, 6, 7))
    cotangent = _normal(8, (batch, length, heads, head_dim))
    mask = causal_segment_mask(None, length)
    value, grads = _value_and_grads(lambda q, k, v: causal_attention(q, k, v, mask, 5), q, k, v, cotangent)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    as32 = [x.astype(jnp.float32) for x in (q, k, v)]
    expected_value, expected_grads = _value_and_grads(lambda q, k, v: xla_attention(q, k, v, mask), *as32, cotangent)
    np.testing.assert_allclose(value, expected_value, rtol=2e-2)
    for got, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("segment_ids, block", [
    # blocks of 4 over 10 rows: a document and the padding cross block edges, so a block's rows see
    # keys of the blocks before and after it
    ([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 2, 2, 2, 2, 2, 2, 2]], 4),
    (None, 3),  # one document per row: every query sees every key
])
def test_bidirectional_blocked_attention_matches_full_attention_and_its_gradients(segment_ids, block):
    if segment_ids is None:
        mask = jnp.ones((1, 1, LENGTH, LENGTH), bool)
    else:
        ids = jnp.array(segment_ids)
        mask = (ids[:, :, None] == ids[:, None, :])[:, None]  # the encoder's: same document, either order
    _assert_blocked_matches_full(bidirectional_attention, mask, block)
