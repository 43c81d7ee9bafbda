"""T5's attention: bucketed relative position biases, and dot-product attention that adds them.

T5 has no position embeddings. Each attention score q.k gets a learned bias per head that depends on
the bucket of the distance key position - query position: exact for small distances, logarithmically
coarser up to `relative_max_distance`, one bucket beyond. The encoder's buckets tell the two directions
apart (half of `relative_buckets` each); the decoder, causal, only looks back and uses all of them for
the past. One table [buckets, heads] per stack, shared by its layers (Hugging Face keeps it in block 0
of each stack: the same function). Cross-attention has no position bias.

Scores are not scaled by 1/sqrt(head_dim): T5 folds that factor into the query's init (encdec.py).

The attention is computed explicitly (einsum, float32 scores and softmax, bias added), and the config
refuses any other `model.attention` for relative positions: the fused kernels this package uses
(cpu_kernels, blocked_attention, cuDNN's packed layout, splash) take a mask but no additive bias. Masks
are folded into the same bias (a large negative number where a key is hidden), so one [B or 1, H, L, S]
array per stack carries both.

Shape suffixes as in `layers.py`; N is the number of relative position buckets.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.models.layers import Dense, constrain, to_dtype

# Added to the score of a hidden key. Large enough that its softmax weight is exactly 0, small enough
# that adding a position bias or a score to it stays finite in float32.
MASK_BIAS = -1e30


def relative_position_bucket(relative_BLS: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucket (int32, in [0, num_buckets)) of each relative position key - query.

    Bidirectional: buckets [0, N/2) for keys at or before the query, [N/2, N) for keys after it.
    Causal: keys after the query (which the mask hides anyway) share bucket 0 with distance 0. In each
    direction the first half of its buckets are the exact distances 0, 1, ...; the second half cover
    distances up to max_distance on a log scale; farther keys share the last bucket. Computed as
    Hugging Face's `T5Attention._relative_position_bucket` computes it (float32 log of d / max_exact),
    so that both put a distance on a bucket boundary in the same bucket.
    """
    relative_BLS = jnp.asarray(relative_BLS, jnp.int32)
    if bidirectional:
        num_buckets //= 2
        offset_BLS = jnp.where(relative_BLS > 0, num_buckets, 0)
        distance_BLS = jnp.abs(relative_BLS)
    else:
        offset_BLS = jnp.zeros_like(relative_BLS)
        distance_BLS = -jnp.minimum(relative_BLS, 0)
    max_exact = num_buckets // 2
    is_small_BLS = distance_BLS < max_exact
    # The log of 0 is never used (distance 0 is exact); max(d, 1) only keeps it out of the arithmetic.
    log_ratio_BLS = jnp.log(jnp.maximum(distance_BLS, 1).astype(jnp.float32) / max_exact)
    large_BLS = max_exact + (log_ratio_BLS / math.log(max_distance / max_exact)
                             * (num_buckets - max_exact)).astype(jnp.int32)
    large_BLS = jnp.minimum(large_BLS, num_buckets - 1)
    return offset_BLS + jnp.where(is_small_BLS, distance_BLS, large_BLS)


def position_bias(table_NH: jax.Array, query_positions_BL: jax.Array, key_positions_BS: jax.Array, *,
                  bidirectional: bool, max_distance: int) -> jax.Array:
    """The bias of each (query, key) pair: float32 [B, H, L, S] (B may be 1 for shared positions)."""
    relative_BLS = key_positions_BS[:, None, :] - query_positions_BL[:, :, None]
    bucket_BLS = relative_position_bucket(relative_BLS, bidirectional=bidirectional,
                                          num_buckets=table_NH.shape[0], max_distance=max_distance)
    bias_BLSH = jnp.take(table_NH.astype(jnp.float32), bucket_BLS, axis=0)
    return jnp.transpose(bias_BLSH, (0, 3, 1, 2))


def mask_to_bias(mask_B1LS: jax.Array) -> jax.Array:
    """A boolean mask (True: the query sees the key) as an additive float32 bias: 0 or MASK_BIAS."""
    return jnp.where(mask_B1LS, 0.0, MASK_BIAS).astype(jnp.float32)


class RelativePositionBias(nn.Module):
    """One stack's table [relative_buckets, n_heads]; `table` is read by cached decoding as well.

    The leaf is named "bias": like other biases (an additive offset, not a weight to scale), the
    optimizer leaves it out of weight decay (train/optim.NO_DECAY_NAMES).
    """

    config: ModelConfig
    bidirectional: bool

    def setup(self):
        cfg = self.config
        self.table = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.normal(cfg.d_model**-0.5), (None, "heads")),
            (cfg.relative_buckets, cfg.n_heads), to_dtype(cfg.param_dtype))

    def __call__(self, query_positions_BL: jax.Array, key_positions_BS: jax.Array) -> jax.Array:
        return position_bias(self.table, query_positions_BL, key_positions_BS, bidirectional=self.bidirectional,
                             max_distance=self.config.relative_max_distance)


def biased_attention(q_BLHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, bias_BHLS: jax.Array | None) -> jax.Array:
    """softmax(q.k + bias) v without 1/sqrt(D), grouped-query as `layers.xla_attention`. bias: float32
    [B or 1, H or 1, L, S] (positions and masks), or None. Scores and softmax in float32."""
    batch, length, n_heads, head_dim = q_BLHD.shape
    n_kv = k_BSKD.shape[2]
    groups = n_heads // n_kv
    q_BLKGD = q_BLHD.reshape(batch, length, n_kv, groups, head_dim)
    scores_BKGLS = jnp.einsum("blkgd,bskd->bkgls", q_BLKGD, k_BSKD, preferred_element_type=jnp.float32)
    if bias_BHLS is not None:
        bias_batch, bias_heads = bias_BHLS.shape[:2]
        if bias_heads == 1:
            bias_BKGLS = bias_BHLS[:, :, None]
        else:
            bias_BKGLS = bias_BHLS.reshape(bias_batch, n_kv, groups, *bias_BHLS.shape[2:])
        scores_BKGLS = scores_BKGLS + bias_BKGLS
    probs_BKGLS = jax.nn.softmax(scores_BKGLS, axis=-1).astype(v_BSKD.dtype)
    out_BLKGD = jnp.einsum("bkgls,bskd->blkgd", probs_BKGLS, v_BSKD)
    return out_BLKGD.reshape(batch, length, n_heads, head_dim)


def _projection(cfg: ModelConfig, name: str, n_heads: int, heads_axis: str, init_std: float) -> Dense:
    return Dense(features=(n_heads, cfg.resolved_head_dim), kernel_axes=("embed", heads_axis, "head_dim"),
                 init_std=init_std, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), name=name)


def _out_projection(cfg: ModelConfig, out_BLHD: jax.Array) -> jax.Array:
    out_BLHD = constrain(out_BLHD, ("batch", "length", "heads", "head_dim"))
    return Dense(features=(cfg.d_model,), kernel_axes=("heads", "head_dim", "embed"), n_in=2,
                 init_std=(cfg.n_heads * cfg.resolved_head_dim) ** -0.5, dtype=to_dtype(cfg.dtype),
                 param_dtype=to_dtype(cfg.param_dtype), name="out")(out_BLHD)


def _query(cfg: ModelConfig, x_BLE: jax.Array) -> jax.Array:
    # T5's init (Hugging Face's _init_weights, factor 1): the query carries the 1/sqrt(head_dim) that
    # the scores leave out; keys and values are plain fan-in.
    q_BLHD = _projection(cfg, "query", cfg.n_heads, "heads", (cfg.d_model * cfg.resolved_head_dim) ** -0.5)(x_BLE)
    return constrain(q_BLHD, ("batch", "length", "heads", "head_dim"))


def _keys_values(cfg: ModelConfig, x_BSE: jax.Array) -> tuple[jax.Array, jax.Array]:
    k_BSKD = _projection(cfg, "key", cfg.kv_heads, "kv_heads", cfg.d_model**-0.5)(x_BSE)
    v_BSKD = _projection(cfg, "value", cfg.kv_heads, "kv_heads", cfg.d_model**-0.5)(x_BSE)
    return (constrain(k_BSKD, ("batch", "length", "kv_heads", "head_dim")),
            constrain(v_BSKD, ("batch", "length", "kv_heads", "head_dim")))


class SelfAttention(nn.Module):
    """Self-attention with a precomputed bias (positions and mask); the decoder's has a KV cache.

    Decoding follows the Flax convention of `layers.Attention`: a decode call without a cache creates
    zeroed keys/values [B, S, K, D] (S: that call's length, the longest target) and index 0, attending as
    usual; each later decode call writes its keys/values at the index and attends to every slot written
    so far, with the relative bias of its queries' absolute positions (index, index + 1, ...) against
    the slots' (0 .. S-1), computed here from the stack's table (`table_NH`): only here is S known.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLE: jax.Array, bias_BHLL: jax.Array, table_NH: jax.Array | None = None,
                 decode: bool = False) -> jax.Array:
        cfg = self.config
        q_BLHD = _query(cfg, x_BLE)
        k_BLKD, v_BLKD = _keys_values(cfg, x_BLE)
        if decode and self.has_variable("cache", "cached_key"):
            out_BLHD = self._cached_attention(q_BLHD, k_BLKD, v_BLKD, table_NH)
        else:
            if decode:  # the first decode call: create the cache, sized by this full-length input
                self._cache_variables(k_BLKD.shape, k_BLKD.dtype)
            out_BLHD = biased_attention(q_BLHD, k_BLKD, v_BLKD, bias_BHLL)
        return _out_projection(cfg, out_BLHD)

    def _cache_variables(self, shape_BSKD: tuple[int, ...], dtype: jnp.dtype):
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape_BSKD, dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape_BSKD, dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        return cached_key, cached_value, cache_index

    def _cached_attention(self, q_BLHD, k_BLKD, v_BLKD, table_NH):
        cfg = self.config
        cached_key, cached_value, cache_index = self._cache_variables(k_BLKD.shape, k_BLKD.dtype)
        index = cache_index.value
        k_BSKD = jax.lax.dynamic_update_slice(cached_key.value, k_BLKD.astype(cached_key.value.dtype),
                                              (0, index, 0, 0))
        v_BSKD = jax.lax.dynamic_update_slice(cached_value.value, v_BLKD.astype(cached_value.value.dtype),
                                              (0, index, 0, 0))
        length, max_length = k_BLKD.shape[1], k_BSKD.shape[1]
        cached_key.value, cached_value.value = k_BSKD, v_BSKD
        cache_index.value = index + length
        query_positions_1L = (index + jnp.arange(length, dtype=jnp.int32))[None, :]
        key_positions_1S = jnp.arange(max_length, dtype=jnp.int32)[None, :]
        bias_1HLS = position_bias(table_NH, query_positions_1L, key_positions_1S, bidirectional=False,
                                  max_distance=cfg.relative_max_distance)
        # Slots after the query are unwritten (or the future): hidden.
        mask_11LS = (key_positions_1S[:, None, :] <= query_positions_1L[:, :, None])[:, None]
        return biased_attention(q_BLHD, k_BSKD, v_BSKD, bias_1HLS + mask_to_bias(mask_11LS))


class CrossAttention(nn.Module):
    """The decoder's attention to the encoder's output; no position bias, only the mask's.

    In decode mode the keys/values of `encoded_BSE` are computed by the first decode call and kept in
    the "cache" collection; later calls read them and do not project `encoded_BSE` again.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLE: jax.Array, encoded_BSE: jax.Array, bias_B1LS: jax.Array | None,
                 decode: bool = False) -> jax.Array:
        cfg = self.config
        q_BLHD = _query(cfg, x_BLE)
        if decode and self.has_variable("cache", "cached_key"):
            k_BSKD = self.variable("cache", "cached_key").value
            v_BSKD = self.variable("cache", "cached_value").value
        else:
            k_BSKD, v_BSKD = _keys_values(cfg, encoded_BSE)
            if decode:
                self.variable("cache", "cached_key", lambda: k_BSKD)
                self.variable("cache", "cached_value", lambda: v_BSKD)
        return _out_projection(cfg, biased_attention(q_BLHD, k_BSKD, v_BSKD, bias_B1LS))
