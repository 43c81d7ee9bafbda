"""Autoregressive sampling with a KV cache: one start of the decoder, then one token per step.

The whole loop runs inside one jitted function (`jax.lax.while_loop`), so a continuation costs one
host round trip, not one per token. As in T5X's decoding, the loop knows nothing of the family: it
calls a `tokens_to_logits(cache, tokens_1L) -> (cache, logits_1V)` function with an explicit cache,
and each family only says how the decoder starts (`_decoder_start`, `_encoder_decoder_start`): the
cache it begins with and the logits of the first new token.

- A decoder (gpt2, llama) prefills its cache with the prompt; the prompt is the start of the text.
- An encoder-decoder (t5) encodes the prompt once; the decoder's cache holds its own keys/values and
  the cross-attention keys/values of the encoded prompt (computed once, when the cache is created),
  and the decoder starts from id 0 (pad, T5's decoder start). What it generates is the target.

Compiled programs are cached per (model config, prompt length, max_new_tokens, top_k); temperature,
eos and the rng are traced and never recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.models.build import make_model

DECODER_START_ID = 0  # an encoder-decoder's first decoder input (pad), as in training (data/pipeline.py)

# (cache, tokens [1, L]) -> (cache with the tokens written, float32 logits [1, V] after the last token)
TokensToLogits = Callable[[Any, jax.Array], tuple[Any, jax.Array]]


def sample_logits(logits_BV: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: int) -> jax.Array:
    """Next ids [B] from float32 logits. temperature 0 -> argmax; top_k 0 -> the full vocabulary."""
    logits_BV = logits_BV.astype(jnp.float32)
    if top_k > 0:
        k = min(top_k, logits_BV.shape[-1])
        kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, k - 1:k]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    greedy_B = jnp.argmax(logits_BV, axis=-1)
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    sampled_B = jax.random.categorical(rng, scaled_BV, axis=-1)
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


def _decoder_start(model: nn.Module, params, prompt_1P: jax.Array,
                   max_new_tokens: int) -> tuple[TokensToLogits, Any, jax.Array]:
    """A decoder's cache, sized for prompt + continuation and prefilled with the prompt."""
    total = prompt_1P.shape[1] + max_new_tokens
    # The cache starts as zeros (the decode init's own values), so its shapes suffice.
    cache_shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, total), jnp.int32), decode=True)["cache"])
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)

    def tokens_to_logits(cache, tokens_1L):
        logits_1LV, mutated = model.apply({"params": params, "cache": cache}, tokens_1L, decode=True,
                                          mutable=["cache"])
        return mutated["cache"], logits_1LV[:, -1, :]

    cache, logits_1V = tokens_to_logits(cache, prompt_1P)
    return tokens_to_logits, cache, logits_1V


def _encoder_decoder_start(model: nn.Module, params, prompt_1P: jax.Array,
                           max_new_tokens: int) -> tuple[TokensToLogits, Any, jax.Array]:
    """The prompt encoded once; a decoder cache holding its cross-attention keys/values, then the
    decoder start id fed."""
    segments_1P = jnp.ones_like(prompt_1P)  # one example, no padding
    encoded_1PE = model.apply({"params": params}, prompt_1P, encoder_segment_ids=segments_1P, method="encode")

    def decode(variables, tokens_1L):
        return model.apply(variables, tokens_1L, encoded_1PE, encoder_segment_ids=segments_1P, decode=True,
                           mutable=["cache"], method="decode")

    # The call on no cache creates it: zeroed self-attention keys/values for the start id and each
    # new token (the loop feeds every sampled token back, the last one too), and the encoded
    # prompt's cross-attention keys/values.
    _, created = decode({"params": params}, jnp.zeros((1, max_new_tokens + 1), jnp.int32))

    def tokens_to_logits(cache, tokens_1L):
        logits_1LV, mutated = decode({"params": params, "cache": cache}, tokens_1L)
        return mutated["cache"], logits_1LV[:, -1, :]

    start_11 = jnp.full((1, 1), DECODER_START_ID, jnp.int32)
    cache, logits_1V = tokens_to_logits(created["cache"], start_11)
    return tokens_to_logits, cache, logits_1V


def _sample_loop(tokens_to_logits: TokensToLogits, cache, logits_1V: jax.Array, rng: jax.Array,
                 temperature: jax.Array, eos_id: jax.Array, *, max_new_tokens: int, top_k: int):
    """Samples from `logits_1V`, feeds the token back, and so on: (new ids [max_new_tokens], how many
    of them are valid). Stops after max_new_tokens or right after sampling eos_id."""
    rng, first_rng = jax.random.split(rng)
    token_1 = sample_logits(logits_1V, first_rng, temperature, top_k)
    out_N = jnp.zeros((max_new_tokens,), jnp.int32)

    def cond(state):
        i, _, _, _, _, done = state
        return jnp.logical_and(i < max_new_tokens, jnp.logical_not(done))

    def body(state):
        i, token_1, cache, rng, out_N, _ = state
        out_N = out_N.at[i].set(token_1[0])
        done = token_1[0] == eos_id
        # The last step's forward pass is wasted, but it keeps the loop body a single shape.
        cache, logits_1V = tokens_to_logits(cache, token_1[:, None])
        rng, step_rng = jax.random.split(rng)
        next_1 = sample_logits(logits_1V, step_rng, temperature, top_k)
        return i + 1, next_1, cache, rng, out_N, done

    state = (jnp.array(0, jnp.int32), token_1, cache, rng, out_N, jnp.array(False))
    n_valid, _, _, _, out_N, _ = jax.lax.while_loop(cond, body, state)
    return out_N, n_valid


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "top_k"))
def _generate_jit(config: ModelConfig, params, prompt_1P: jax.Array, rng: jax.Array, temperature: jax.Array,
                  eos_id: jax.Array, *, max_new_tokens: int, top_k: int):
    """Returns (new ids [max_new_tokens], how many of them are valid)."""
    start = _encoder_decoder_start if config.family.encoder_decoder else _decoder_start
    tokens_to_logits, cache, logits_1V = start(make_model(config), params, prompt_1P, max_new_tokens)
    return _sample_loop(tokens_to_logits, cache, logits_1V, rng, temperature, eos_id,
                        max_new_tokens=max_new_tokens, top_k=top_k)


def generate(model: nn.Module, params, prompt_ids: list[int] | np.ndarray, *, max_new_tokens: int,
             rng: jax.Array, temperature: float = 1.0, top_k: int = 0, eos_id: int | None = None) -> list[int]:
    """Sampled ids after `prompt_ids`. temperature 0 = greedy.

    A decoder returns prompt + continuation (one text); an encoder-decoder the generated target
    alone (the prompt is its encoder's input, not the start of its output). `params` are unboxed.
    Stops after `max_new_tokens` or right after sampling `eos_id`, which is included in the result
    so callers can tell the two endings apart.
    """
    prompt = [int(t) for t in np.asarray(prompt_ids).reshape(-1)]
    if not prompt:
        raise ValueError("generate needs a prompt of at least one token")
    config = model.config
    kept = [] if config.family.encoder_decoder else prompt
    if max_new_tokens <= 0:
        return kept
    if config.resolved_position == "learned" and len(prompt) + max_new_tokens > config.max_len:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"model.max_len ({config.max_len}) of the learned positions")
    out_N, n_valid = _generate_jit(
        config, params, jnp.asarray([prompt], jnp.int32), rng, jnp.asarray(temperature, jnp.float32),
        jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32), max_new_tokens=max_new_tokens, top_k=top_k,
    )
    n_valid = int(n_valid)
    return kept + [int(t) for t in np.asarray(out_N)[:n_valid]]
