"""Losses as (sum, weight) pairs: normalise late, so padding, packing, accumulation and many
hosts all give the same mean as one big unpadded batch would."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy_sum(logits_BLV: jax.Array, targets_BL: jax.Array,
                      weights_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross entropy over real targets, and how many there were.

    Logits are upcast to float32 so the log-softmax is accurate for bf16 models too.
    """
    losses_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32), targets_BL)
    weights_BL = weights_BL.astype(jnp.float32)
    return jnp.sum(losses_BL * weights_BL), jnp.sum(weights_BL)


def accuracy_sum(logits_BLV: jax.Array, targets_BL: jax.Array,
                 weights_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """How many weighted targets the logits rank first, and how many there were (masked LM: the
    masked positions; a tie counts for the lowest id, as argmax does)."""
    weights_BL = weights_BL.astype(jnp.float32)
    correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
    return jnp.sum(correct_BL * weights_BL), jnp.sum(weights_BL)


def mean_loss(loss_sum: jax.Array, weight_sum: jax.Array) -> jax.Array:
    """The mean loss; an all-padding batch gives 0 rather than NaN."""
    return loss_sum / jnp.maximum(weight_sum, 1.0)
