"""Self-attention for the explicit path (`model.attention=xla`), query block by query block: causal
(decoders) and bidirectional (encoders).

On CPU (and wherever no fused attention kernel is used) attention is memory-bound: the [L, S]
score matrices are written and read several times, forward and backward. Three things cut that
down (measured alone and in the baby GPT's step: docs/benchmarks.md):

- Queries go in blocks of `block` rows, so each block's scores are small; when causal, each block
  goes against only the keys up to its last row, so the fully masked blocks above the diagonal are
  never computed (bidirectional: against every key; the mask keeps each to its document).
- Heads are moved in front of the sequence axes once per layer, keys and values transposed to
  [B, K, D, S]: every matmul of the forward and backward pass is then a plain batched matmul
  whose operands need no further copies.
- A hand-written backward (FlashAttention's): it keeps the output and the log-sum-exp of each row
  instead of the probabilities, recomputes the probabilities of a block when needed, and gets the
  softmax's row correction from rowsum(dout * out) over D instead of rowsum(dp * p) over S.

Same function as `layers.xla_attention` with the same mask (to float32 rounding); scores, softmax and
the row statistics are float32 whatever the input dtype. Where the step runs on one CPU device in
float32 the fused C++ kernel (cpu_kernels.py) is used instead; this form is for the other cases
(sharded meshes, bf16, accelerators without a fused kernel).
Shape letters as in `layers.py`; here L = S (self-attention) and a block's rows are l.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Query rows per block: 128 made the fastest baby-GPT step (256 tokens) on CPU of 32, 64 and 128.
CAUSAL_QUERY_BLOCK = 128
# Without a diagonal to skip, a block only bounds the size of the scores held at once: the causal
# size, not measured apart.
BIDIRECTIONAL_QUERY_BLOCK = 128

# As in layers.py: large enough to zero a softmax entry, small enough not to overflow float32 when subtracted.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def causal_attention(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array, mask_B1LL: jax.Array,
                     block: int = CAUSAL_QUERY_BLOCK) -> jax.Array:
    """Grouped-query attention under a causal (and document) mask whose row i hides keys after i.

    Only the blocks on or below the diagonal are computed: the mask must be causal, as
    `causal_segment_mask` makes it. Returns [B, L, H, D] in q's dtype.
    """
    return _attention(q_BLHD, k_BLKD, v_BLKD, mask_B1LL, block, causal=True)


def bidirectional_attention(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array, mask_B1LL: jax.Array,
                            block: int = BIDIRECTIONAL_QUERY_BLOCK) -> jax.Array:
    """Grouped-query attention under any mask (an encoder's: each token sees its whole document), every
    query block against every key. Returns [B, L, H, D] in q's dtype."""
    return _attention(q_BLHD, k_BLKD, v_BLKD, mask_B1LL, block, causal=False)


def _attention(q_BLHD, k_BLKD, v_BLKD, mask_B1LL, block: int, causal: bool):
    batch, length, n_heads, head_dim = q_BLHD.shape
    n_kv = k_BLKD.shape[2]
    q_BKGLD = jnp.transpose(q_BLHD.reshape(batch, length, n_kv, n_heads // n_kv, head_dim), (0, 2, 3, 1, 4))
    kT_BKDS = jnp.transpose(k_BLKD, (0, 2, 3, 1))
    vT_BKDS = jnp.transpose(v_BLKD, (0, 2, 3, 1))
    out_BKGLD = _blocked_attention(q_BKGLD, kT_BKDS, vT_BKDS, mask_B1LL, block, causal)
    return jnp.transpose(out_BKGLD, (0, 3, 1, 2, 4)).reshape(batch, length, n_heads, head_dim)


def _blocks(length: int, block: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first row, end, keys) of each query block: its rows [first row, end) attend to keys [0, keys),
    those up to its last row when causal, all of them otherwise."""
    return [(start, min(start + block, length), min(start + block, length) if causal else length)
            for start in range(0, length, block)]


def _masked_scores(q_BKGlD, kT_BKDs, mask_B1ls):
    """Scaled scores of one query block against its keys, float32, masked entries very negative."""
    scale = 1.0 / math.sqrt(q_BKGlD.shape[-1])
    scores_BKGls = jnp.einsum("bkgld,bkds->bkgls", q_BKGlD, kT_BKDs, preferred_element_type=jnp.float32)
    return jnp.where(mask_B1ls[:, :, None, :, :], scores_BKGls * scale, _MASK_VALUE)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked_attention(q_BKGLD, kT_BKDS, vT_BKDS, mask_B1LS, block, causal):
    return _forward(q_BKGLD, kT_BKDS, vT_BKDS, mask_B1LS, block, causal)[0]


def _forward(q_BKGLD, kT_BKDS, vT_BKDS, mask_B1LS, block, causal):
    outs, lses = [], []
    for start, end, keys in _blocks(q_BKGLD.shape[3], block, causal):
        scores_BKGls = _masked_scores(q_BKGLD[:, :, :, start:end], kT_BKDS[..., :keys],
                                      mask_B1LS[:, :, start:end, :keys])
        row_max_BKGl1 = jnp.max(scores_BKGls, axis=-1, keepdims=True)
        unnormalised_BKGls = jnp.exp(scores_BKGls - row_max_BKGl1)
        row_sum_BKGl1 = jnp.sum(unnormalised_BKGls, axis=-1, keepdims=True)
        # Normalise the [l, D] output rather than the [l, S] probabilities: one pass less over the big array.
        out_BKGlD = jnp.einsum("bkgls,bkds->bkgld", unnormalised_BKGls.astype(vT_BKDS.dtype), vT_BKDS[..., :keys],
                               preferred_element_type=jnp.float32) / row_sum_BKGl1
        outs.append(out_BKGlD.astype(q_BKGLD.dtype))
        lses.append(row_max_BKGl1 + jnp.log(row_sum_BKGl1))
    out_BKGLD = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    lse_BKGL1 = jnp.concatenate(lses, axis=3) if len(lses) > 1 else lses[0]
    return out_BKGLD, (q_BKGLD, kT_BKDS, vT_BKDS, mask_B1LS, out_BKGLD, lse_BKGL1)


def _backward(block, causal, residuals, dout_BKGLD):
    q_BKGLD, kT_BKDS, vT_BKDS, mask_B1LS, out_BKGLD, lse_BKGL1 = residuals
    dtype = q_BKGLD.dtype
    scale = 1.0 / math.sqrt(q_BKGLD.shape[-1])
    length = kT_BKDS.shape[-1]
    # d softmax: dscores = p * (dp - rowsum(dp * p)), and rowsum(dp * p) = rowsum(dout * out).
    correction_BKGL1 = jnp.sum(dout_BKGLD.astype(jnp.float32) * out_BKGLD.astype(jnp.float32), axis=-1,
                               keepdims=True)
    dq_blocks = []
    dkT_BKDS = jnp.zeros(kT_BKDS.shape, jnp.float32)
    dvT_BKDS = jnp.zeros(vT_BKDS.shape, jnp.float32)
    for start, end, keys in _blocks(q_BKGLD.shape[3], block, causal):
        q_BKGlD, dout_BKGlD = q_BKGLD[:, :, :, start:end], dout_BKGLD[:, :, :, start:end]
        kT_BKDs, vT_BKDs = kT_BKDS[..., :keys], vT_BKDS[..., :keys]
        scores_BKGls = _masked_scores(q_BKGlD, kT_BKDs, mask_B1LS[:, :, start:end, :keys])
        probs_BKGls = jnp.exp(scores_BKGls - lse_BKGL1[:, :, :, start:end])
        # Products written as [D, s] (sum over the groups and the block's rows), so the big [l, s] operand
        # is contracted along its leading axis and needs no transposed copy.
        dvT_BKDs = jnp.einsum("bkgld,bkgls->bkds", dout_BKGlD, probs_BKGls.astype(dtype),
                              preferred_element_type=jnp.float32)
        dprobs_BKGls = jnp.einsum("bkgld,bkds->bkgls", dout_BKGlD, vT_BKDs, preferred_element_type=jnp.float32)
        dscores_BKGls = (probs_BKGls * (dprobs_BKGls - correction_BKGL1[:, :, :, start:end]) * scale).astype(dtype)
        dq_blocks.append(jnp.einsum("bkgls,bkds->bkgld", dscores_BKGls, kT_BKDs, preferred_element_type=jnp.float32))
        dkT_BKDs = jnp.einsum("bkgld,bkgls->bkds", q_BKGlD, dscores_BKGls, preferred_element_type=jnp.float32)
        pad = ((0, 0), (0, 0), (0, 0), (0, length - keys))  # this block's keys are the first `keys`
        dkT_BKDS = dkT_BKDS + jnp.pad(dkT_BKDs, pad)
        dvT_BKDS = dvT_BKDS + jnp.pad(dvT_BKDs, pad)
    dq_BKGLD = jnp.concatenate(dq_blocks, axis=3) if len(dq_blocks) > 1 else dq_blocks[0]
    return dq_BKGLD.astype(dtype), dkT_BKDS.astype(kT_BKDS.dtype), dvT_BKDS.astype(vT_BKDS.dtype), None


_blocked_attention.defvjp(_forward, _backward)
