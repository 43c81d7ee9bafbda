"""Autoregressive sampling with a KV cache: one prefill of the prompt, then one token per step.

The whole loop runs inside one jitted function (`jax.lax.while_loop`), so a continuation costs one
host round trip, not one per token. Compiled programs are cached per (model config, prompt length,
max_new_tokens, top_k); temperature, eos and the rng are traced and never recompile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.models.decoder import Transformer


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


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "top_k"))
def _generate_jit(config: ModelConfig, params, prompt_1P: jax.Array, rng: jax.Array, temperature: jax.Array,
                  eos_id: jax.Array, *, max_new_tokens: int, top_k: int):
    """Returns (new ids [max_new_tokens], how many of them are valid)."""
    model = Transformer(config)
    total = prompt_1P.shape[1] + max_new_tokens
    # The cache starts as zeros (the decode init's own values), so its shapes suffice.
    cache_shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, total), jnp.int32), decode=True)["cache"]
    )
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)

    def step(cache, tokens_1L):
        logits_1LV, mutated = model.apply({"params": params, "cache": cache}, tokens_1L, decode=True,
                                          mutable=["cache"])
        return mutated["cache"], logits_1LV[:, -1, :]

    cache, logits_1V = step(cache, prompt_1P)
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
        cache, logits_1V = step(cache, token_1[:, None])
        rng, step_rng = jax.random.split(rng)
        next_1 = sample_logits(logits_1V, step_rng, temperature, top_k)
        return i + 1, next_1, cache, rng, out_N, done

    state = (jnp.array(0, jnp.int32), token_1, cache, rng, out_N, jnp.array(False))
    n_valid, _, _, _, out_N, _ = jax.lax.while_loop(cond, body, state)
    return out_N, n_valid


def generate(model: Transformer, params, prompt_ids: list[int] | np.ndarray, *, max_new_tokens: int,
             rng: jax.Array, temperature: float = 1.0, top_k: int = 0, eos_id: int | None = None) -> list[int]:
    """Prompt + sampled continuation ids. temperature 0 = greedy.

    `params` are unboxed. Stops after `max_new_tokens` or right after sampling `eos_id`, which is
    included in the result so callers can tell the two endings apart.
    """
    prompt = [int(t) for t in np.asarray(prompt_ids).reshape(-1)]
    if not prompt:
        raise ValueError("generate needs a prompt of at least one token")
    if max_new_tokens <= 0:
        return prompt
    config = model.config
    if config.resolved_position == "learned" and len(prompt) + max_new_tokens > config.max_len:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"model.max_len ({config.max_len}) of the learned positions")
    out_N, n_valid = _generate_jit(
        config, params, jnp.asarray([prompt], jnp.int32), rng, jnp.asarray(temperature, jnp.float32),
        jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32), max_new_tokens=max_new_tokens, top_k=top_k,
    )
    n_valid = int(n_valid)
    return prompt + [int(t) for t in np.asarray(out_N)[:n_valid]]
