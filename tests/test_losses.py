import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.train.losses import cross_entropy_sum, mean_loss


def test_padding_does_not_change_the_mean():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5)).astype(np.int32)
    weights = np.ones((2, 5), np.float32)
    loss_sum, weight_sum = cross_entropy_sum(logits, targets, weights)

    # The same rows with three padded positions of garbage appended.
    pad_logits = np.concatenate([logits, rng.normal(size=(2, 3, 11)).astype(np.float32) * 50], axis=1)
    pad_targets = np.concatenate([targets, np.zeros((2, 3), np.int32)], axis=1)
    pad_weights = np.concatenate([weights, np.zeros((2, 3), np.float32)], axis=1)
    pad_sum, pad_weight = cross_entropy_sum(pad_logits, pad_targets, pad_weights)

    assert float(weight_sum) == 10 and float(pad_weight) == 10
    np.testing.assert_allclose(pad_sum, loss_sum, rtol=1e-6)
    expected = -np.mean(np.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    np.testing.assert_allclose(mean_loss(loss_sum, weight_sum), expected, rtol=1e-6)


def test_uniform_logits_give_log_vocab():
    loss_sum, weight_sum = cross_entropy_sum(jnp.zeros((1, 4, 8)), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4)))
    assert float(mean_loss(loss_sum, weight_sum)) == pytest.approx(np.log(8), rel=1e-6)


def test_bf16_logits_are_upcast():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 7)), jnp.bfloat16)
    loss_sum, _ = cross_entropy_sum(logits, jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3)))
    assert loss_sum.dtype == jnp.float32


def test_all_padding_gives_zero_not_nan():
    loss_sum, weight_sum = cross_entropy_sum(jnp.zeros((1, 2, 5)), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2)))
    assert float(mean_loss(loss_sum, weight_sum)) == 0.0
