"""Token choice: the logits processors and filters of decoding, as small pure functions (praxis' samplers).

Each takes float32 logits [B, V] and returns logits of the same shape, a filtered token at -inf; the
decoding loop (generate.py) applies them in Hugging Face's order: repetition penalty, the eos mask of
`min_new_tokens`, temperature, top-k, top-p, min-p; then draws from what is left (or takes the argmax,
temperature 0). The log-probability a generation reports is of the *unfiltered* model distribution
(`log_softmax` of the raw logits), so filters change which token is drawn, never how it is scored.

Ties: top-k keeps every token whose logit equals the k-th largest (possibly more than k); top-p ranks
tokens by logit with equal logits in id order (a stable sort), and keeps a prefix of that order, so
of tokens tied at the boundary the lower ids are kept first.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Frozen and hashable: a static argument of the compiled loop (a
    change recompiles, which the command line never does within a run).

    temperature 0 is greedy (argmax; the filters then change nothing). top_k 0, top_p 1.0, min_p 0.0
    and repetition_penalty 1.0 are off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def check(self, what: str = "generate") -> None:
        """ValueError naming the option, for values that would sample nonsense or nothing."""
        if not self.temperature >= 0:
            raise ValueError(f"{what} --temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"{what} --top-k must be >= 0 (0: the whole vocabulary), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{what} --top-p must be in (0, 1] (1: off), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"{what} --min-p must be in [0, 1) (0: off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"{what} --repetition-penalty must be > 0 (1: off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def repetition_penalty(logits_BV: jax.Array, present_BV: jax.Array, penalty: float) -> jax.Array:
    """Hugging Face's: a token already present (prompt or generated so far) has a positive logit
    divided by `penalty`, a negative one multiplied by it (both lower it for penalty > 1)."""
    if penalty == 1.0:
        return logits_BV
    penalised_BV = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(present_BV, penalised_BV, logits_BV)


def mask_token(logits_BV: jax.Array, token_id: jax.Array, masked: jax.Array) -> jax.Array:
    """`token_id` (a scalar; negative: none) at -inf where `masked` ([] or [B]): eos before
    min_new_tokens."""
    hit_BV = jnp.arange(logits_BV.shape[-1])[None, :] == token_id
    return jnp.where(jnp.logical_and(hit_BV, jnp.reshape(masked, (-1, 1))), -jnp.inf, logits_BV)


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits (and any tied with the k-th); k 0: all."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, k - 1:k]
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_filter(logits_BV: jax.Array, p: float) -> jax.Array:
    """Nucleus: keeps exactly the smallest set of most likely tokens whose probability reaches p.

    In descending order of probability a token is kept iff the tokens before it hold less than p:
    the most likely token always, and the set stops at the first token that brings the total to p
    or more. p 1.0: all.
    """
    if p >= 1.0:
        return logits_BV
    order_BV = jnp.argsort(-logits_BV, axis=-1, stable=True)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # the mass of the more likely tokens
    keep_sorted_BV = before_BV < p
    keep_BV = jnp.zeros_like(keep_sorted_BV).at[jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(keep_sorted_BV)
    return jnp.where(keep_BV, logits_BV, -jnp.inf)


def min_p_filter(logits_BV: jax.Array, min_p: float) -> jax.Array:
    """Keeps the tokens at least `min_p` times as likely as the most likely one; 0: all."""
    if min_p <= 0.0:
        return logits_BV
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    floor_B1 = min_p * jnp.max(probs_BV, axis=-1, keepdims=True)
    return jnp.where(probs_BV < floor_B1, -jnp.inf, logits_BV)


def warp(logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature, then top-k, top-p and min-p, over the (already penalised) logits."""
    logits_BV = logits_BV / sampling.temperature
    logits_BV = top_k_filter(logits_BV, sampling.top_k)
    logits_BV = top_p_filter(logits_BV, sampling.top_p)
    return min_p_filter(logits_BV, sampling.min_p)


def choose(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Next ids [B] int32 from processed logits: the argmax (greedy), or a draw after `warp`."""
    if sampling.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, warp(logits_BV, sampling), axis=-1).astype(jnp.int32)


def token_logprob(logits_BV: jax.Array, ids_B: jax.Array) -> jax.Array:
    """log p(id) under the model's own (unfiltered) distribution, float32 [B]."""
    logprobs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logprobs_BV, ids_B[:, None], axis=-1)[:, 0]


def mark_present(present_BV: jax.Array, ids_B: jax.Array) -> jax.Array:
    """The repetition penalty's record: `ids_B` now present in their rows."""
    return present_BV.at[jnp.arange(ids_B.shape[0]), ids_B].set(True)
