"""Batched generation with a KV cache: one start of the decoder, then one token per step for every row.

The whole loop runs inside one jitted function (`jax.lax.while_loop`), so a batch of continuations
costs one host round trip, not one per token. As in T5X's decoding, the loop knows nothing of the
family: it calls a `tokens_to_logits(cache, tokens_B1, step)` function with an explicit cache, and
each family only says how the decoder starts (`_decoder_start`, `_encoder_decoder_start`): the cache
it begins with, the logits of the first new token, and the step function.

- A decoder (gpt2, llama) prefills its cache with the prompts, *left padded* to one length: every
  row's last prompt token sits in the same slot, so all rows write their new tokens at one cache
  index. Padding slots are written with segment id 0, which the cached attention never attends to
  (layers.Attention), and each row's positions start at 0 at its first real token, so a row computes
  what it would alone: batched greedy equals one-by-one greedy (tests/test_generate.py).
- An encoder-decoder (t5) encodes the prompts once, right padded with encoder segment id 0 (which
  cross-attention never sees); the decoder's cache holds its own keys/values and the cross-attention
  keys/values of the encoded prompts, and every row starts from id 0 (pad, T5's decoder start).
  What it generates is the target.

Prompt lengths are bucketed (`bucket_length`) and a short last batch is filled with copies of its
first prompt, so a file of prompts compiles a few programs, not one per length. Beam search
(beam_search.py) shares the starts: its beams are rows of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.infer import sampling as sampling_lib
from llm_jax.infer.sampling import Sampling
from llm_jax.models.build import make_model

DECODER_START_ID = 0  # an encoder-decoder's first decoder input (pad), as in training (data/pipeline.py)
MIN_BUCKET = 16  # the shortest padded prompt length

# (cache, tokens [R, 1], step: how many tokens were generated before these) -> (cache, float32 logits [R, V])
TokensToLogits = Callable[[Any, jax.Array, jax.Array], tuple[Any, jax.Array]]
# Called on the host after each step with (step, the tokens chosen [R], which rows were still running [R]).
OnStep = Callable[[int, np.ndarray, np.ndarray], None]


@dataclasses.dataclass(frozen=True)
class Decoding:
    """What to generate: static for the compiled loop (hashable).

    num_beams > 1 is beam search (beam_search.py; `sampling` then only contributes its repetition
    penalty); num_return_sequences: that many samples per prompt, or the best beams.
    early_stopping: True, False or "never", as Hugging Face's `generate` reads it.
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    sampling: Sampling = Sampling()
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1

    def check(self) -> None:
        """ValueError naming the command-line option, before any work."""
        self.sampling.check()
        if self.max_new_tokens < 1:
            raise ValueError(f"generate --max-new-tokens must be positive, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"generate --min-new-tokens must be in [0, --max-new-tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"generate --num-beams must be positive, got {self.num_beams}")
        if self.num_return_sequences < 1:
            raise ValueError(f"generate --num-return-sequences must be positive, got {self.num_return_sequences}")
        if self.num_beams == 1 and self.sampling.greedy and self.num_return_sequences > 1:
            raise ValueError("generate --num-return-sequences above 1 needs sampling (--temperature > 0) or "
                             "--num-beams: greedy decoding would return the same sequence each time")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"generate --num-return-sequences ({self.num_return_sequences}) must be at most "
                             f"--num-beams ({self.num_beams}): beam search returns its best beams")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"generate --early-stopping must be true, false or never, got {self.early_stopping!r}")


@dataclasses.dataclass
class Generation:
    """One generated sequence: its new ids (eos included when it ended there), why it ended
    ("eos" | "length"; "stop" is decided on the host, from the text), and the sum of the chosen
    ids' log-probabilities under the model's unfiltered distribution (beam search: the beam's
    summed, processed log-probabilities, which are the model's unless a repetition penalty is on)."""

    tokens: list[int]
    finish_reason: str
    logprob: float
    score: float | None = None  # beam search: logprob / len(tokens) ** length_penalty, what ranks the beams
    token_logprobs: list[float] | None = None  # each token's (sampling and greedy; beam search: None)


def bucket_length(length: int) -> int:
    """The padded prompt length: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length())


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, *, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids [R, length], real [R, length] int32: 1 at a prompt's tokens, 0 at padding)."""
    ids = np.zeros((len(prompts), length), np.int32)
    real = np.zeros((len(prompts), length), np.int32)
    for r, prompt in enumerate(prompts):
        span = slice(length - len(prompt), length) if left else slice(0, len(prompt))
        ids[r, span], real[r, span] = prompt, 1
    return ids, real


def _decoder_start(model: nn.Module, params, prompt_RP: jax.Array, real_RP: jax.Array,
                   max_new_tokens: int) -> tuple[TokensToLogits, Any, jax.Array]:
    """A decoder's cache, sized for prompt + continuation and prefilled with the left-padded prompts."""
    rows, prompt_len = prompt_RP.shape
    # The cache starts as zeros (the decode init's own values), so its shapes suffice.
    cache_shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((rows, prompt_len + max_new_tokens), jnp.int32), decode=True)["cache"])
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)
    lengths_R = jnp.sum(real_RP, axis=1)
    positions_RP = jnp.maximum(jnp.cumsum(real_RP, axis=1) - 1, 0)  # 0 at each row's first real token

    def apply(cache, tokens_RL, positions_RL, segment_ids_RL):
        logits_RLV, mutated = model.apply({"params": params, "cache": cache}, tokens_RL, positions_RL,
                                          segment_ids_RL, decode=True, mutable=["cache"])
        return mutated["cache"], logits_RLV[:, -1, :]

    def tokens_to_logits(cache, tokens_R1, step):
        return apply(cache, tokens_R1, (lengths_R + step)[:, None], None)

    cache, logits_RV = apply(cache, prompt_RP, positions_RP, real_RP)
    return tokens_to_logits, cache, logits_RV


def _encoder_decoder_start(model: nn.Module, params, prompt_RP: jax.Array, real_RP: jax.Array,
                           max_new_tokens: int) -> tuple[TokensToLogits, Any, jax.Array]:
    """The prompts encoded once; a decoder cache holding their cross-attention keys/values, then the
    decoder start id fed."""
    encoded_RPE = model.apply({"params": params}, prompt_RP, encoder_segment_ids=real_RP, method="encode")

    def decode(variables, tokens_RL):
        return model.apply(variables, tokens_RL, encoded_RPE, encoder_segment_ids=real_RP, decode=True,
                           mutable=["cache"], method="decode")

    # The call on no cache creates it: zeroed self-attention keys/values for the start id and each
    # new token (the loop feeds every chosen token back, the last one too), and the encoded
    # prompts' cross-attention keys/values.
    _, created = decode({"params": params}, jnp.zeros((prompt_RP.shape[0], max_new_tokens + 1), jnp.int32))

    def tokens_to_logits(cache, tokens_R1, step):
        del step  # the cache's own index is the position
        logits_RLV, mutated = decode({"params": params, "cache": cache}, tokens_R1)
        return mutated["cache"], logits_RLV[:, -1, :]

    start_R1 = jnp.full((prompt_RP.shape[0], 1), DECODER_START_ID, jnp.int32)
    cache, logits_RV = tokens_to_logits(created["cache"], start_R1, 0)
    return tokens_to_logits, cache, logits_RV


def start(config: ModelConfig, params, prompt_RP: jax.Array, real_RP: jax.Array, max_new_tokens: int):
    """(tokens_to_logits, cache, first logits [R, V], tokens present for the repetition penalty [R, V]).

    Present: a decoder's prompt; an encoder-decoder's decoder start id (its prompt is the encoder's
    input, which Hugging Face's penalty does not count either)."""
    model = make_model(config)
    if config.family.encoder_decoder:
        fn, cache, logits_RV = _encoder_decoder_start(model, params, prompt_RP, real_RP, max_new_tokens)
        present_RV = jnp.zeros(logits_RV.shape, bool).at[:, DECODER_START_ID].set(True)
    else:
        fn, cache, logits_RV = _decoder_start(model, params, prompt_RP, real_RP, max_new_tokens)
        rows = jnp.arange(prompt_RP.shape[0])[:, None]
        present_RV = jnp.zeros(logits_RV.shape, bool).at[rows, prompt_RP].max(real_RP > 0)
    return fn, cache, logits_RV, present_RV


def process_logits(logits_RV: jax.Array, present_RV: jax.Array, step, eos_id: jax.Array,
                   decoding: Decoding) -> jax.Array:
    """The logits processors before the choice: repetition penalty, eos masked before min_new_tokens."""
    logits_RV = sampling_lib.repetition_penalty(logits_RV, present_RV, decoding.sampling.repetition_penalty)
    return sampling_lib.mask_token(logits_RV, eos_id, step < decoding.min_new_tokens)


def _sample_loop(tokens_to_logits: TokensToLogits, cache, logits_RV: jax.Array, present_RV: jax.Array,
                 rng: jax.Array, eos_id: jax.Array, *, decoding: Decoding, stream: bool):
    """Chooses from `logits_RV`, feeds the token back, and so on: (new ids [R, N], how many of them
    each row keeps [R], their log-probabilities [R, N]). A row stops after max_new_tokens or right
    after choosing eos_id; the loop stops when every row has."""
    rows, n = logits_RV.shape[0], decoding.max_new_tokens

    def cond(state):
        step, _, _, _, _, _, _, running_R, _ = state
        return jnp.logical_and(step < n, jnp.any(running_R))

    def body(state):
        step, logits_RV, present_RV, cache, rng, out_RN, lengths_R, running_R, logprob_RN = state
        rng, step_rng = jax.random.split(rng)
        processed_RV = process_logits(logits_RV, present_RV, step, eos_id, decoding)
        token_R = sampling_lib.choose(processed_RV, step_rng, decoding.sampling)
        out_RN = out_RN.at[:, step].set(token_R)
        lengths_R = lengths_R + running_R
        logprob_RN = logprob_RN.at[:, step].set(sampling_lib.token_logprob(logits_RV, token_R))
        if stream:
            jax.debug.callback(_on_step_host, step, token_R, running_R, ordered=True)
        running_R = jnp.logical_and(running_R, token_R != eos_id)
        present_RV = sampling_lib.mark_present(present_RV, token_R)
        # The last step's forward pass is wasted, but it keeps the loop body a single shape.
        cache, logits_RV = tokens_to_logits(cache, token_R[:, None], step)
        return step + 1, logits_RV, present_RV, cache, rng, out_RN, lengths_R, running_R, logprob_RN

    state = (jnp.array(0, jnp.int32), logits_RV, present_RV, cache, rng, jnp.zeros((rows, n), jnp.int32),
             jnp.zeros((rows,), jnp.int32), jnp.ones((rows,), bool), jnp.zeros((rows, n), jnp.float32))
    state = jax.lax.while_loop(cond, body, state)
    return state[5], state[6], state[8]


# The host's listener for `stream`: set by `generate_batch` around a streamed call. A module global
# because the callback is traced into the compiled loop, which must not hold a Python closure that
# changes between calls.
_listener: list[OnStep | None] = [None]


def _on_step_host(step, token_R, running_R) -> None:
    if _listener[0] is not None:
        _listener[0](int(step), np.asarray(token_R), np.asarray(running_R))


@functools.partial(jax.jit, static_argnames=("config", "decoding", "stream"))
def sample_rows(config: ModelConfig, params, prompt_RP: jax.Array, real_RP: jax.Array, rng: jax.Array,
                eos_id: jax.Array, *, decoding: Decoding, stream: bool = False):
    """The compiled program of sampling / greedy decoding over prepared rows (`pad_prompts`, one row
    per sequence): (new ids [R, N], kept lengths [R], their log-probabilities [R, N]). eos_id < 0:
    none. `generate_batch` is the friendly entry; bench --decode times this one."""
    fn, cache, logits_RV, present_RV = start(config, params, prompt_RP, real_RP, decoding.max_new_tokens)
    return _sample_loop(fn, cache, logits_RV, present_RV, rng, eos_id, decoding=decoding, stream=stream)


def check_fits(config: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """ValueError when learned positions cannot hold prompt + continuation."""
    if config.resolved_position == "learned" and not config.family.encoder_decoder \
            and prompt_len + max_new_tokens > config.max_len:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"model.max_len ({config.max_len}) of the learned positions")


def _finish(tokens: list[int], eos_id: int | None) -> str:
    return "eos" if tokens and eos_id is not None and tokens[-1] == eos_id else "length"


def generate_batch(model: nn.Module, params, prompts: Sequence[Sequence[int]], decoding: Decoding, *,
                   rng: jax.Array, eos_id: int | None = None, batch_size: int = 8,
                   on_step: OnStep | None = None) -> list[list[Generation]]:
    """For each prompt (a list of ids), its `num_return_sequences` generations, in order.

    Prompts are decoded `batch_size` at a time (rows: prompts x num_return_sequences, or x num_beams),
    each batch one compiled loop. `params` are unboxed. `on_step` (sampling only) is called on the
    host after every step of each batch with the rows' chosen ids: streaming output (cli.py).
    """
    decoding.check()
    prompts = [[int(t) for t in np.asarray(p).reshape(-1)] for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("generate needs prompts of at least one token")
    config = model.config
    for p in prompts:
        check_fits(config, len(p), decoding.max_new_tokens)
    batch_size = min(batch_size, len(prompts))  # a lone prompt is not decoded batch_size times
    copies = decoding.num_beams if decoding.num_beams > 1 else decoding.num_return_sequences
    eos = jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32)
    results: list[list[Generation]] = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first:first + batch_size]
        filled = chunk + [chunk[0]] * (batch_size - len(chunk))  # one batch shape for every chunk
        rows = [p for p in filled for _ in range(copies)]
        ids, real = pad_prompts(rows, bucket_length(max(map(len, filled))),
                                left=not config.family.encoder_decoder)
        rng, batch_rng = jax.random.split(rng)
        if decoding.num_beams > 1:
            from llm_jax.infer import beam_search

            results += beam_search.search(config, params, jnp.asarray(ids), jnp.asarray(real), eos, decoding,
                                          eos_id=eos_id)[:len(chunk)]
            continue
        _listener[0] = on_step
        try:
            out_RN, lengths_R, logprob_RN = jax.device_get(sample_rows(
                config, params, jnp.asarray(ids), jnp.asarray(real), batch_rng, eos, decoding=decoding,
                stream=on_step is not None))
        finally:
            _listener[0] = None
        for b in range(len(chunk)):
            gens = []
            for r in range(b * copies, (b + 1) * copies):
                tokens = [int(t) for t in out_RN[r, :lengths_R[r]]]
                token_logprobs = [float(x) for x in logprob_RN[r, :lengths_R[r]]]
                gens.append(Generation(tokens, _finish(tokens, eos_id), sum(token_logprobs),
                                       token_logprobs=token_logprobs))
            results.append(gens)
    return results


def generate(model: nn.Module, params, prompt_ids: list[int] | np.ndarray, *, max_new_tokens: int,
             rng: jax.Array, temperature: float = 1.0, top_k: int = 0, eos_id: int | None = None) -> list[int]:
    """Sampled ids after one prompt. temperature 0 = greedy.

    A decoder returns prompt + continuation (one text); an encoder-decoder the generated target
    alone (the prompt is its encoder's input, not the start of its output). `params` are unboxed.
    Stops after `max_new_tokens` or right after sampling `eos_id`, which is included in the result
    so callers can tell the two endings apart.
    """
    prompt = [int(t) for t in np.asarray(prompt_ids).reshape(-1)]
    if not prompt:
        raise ValueError("generate needs a prompt of at least one token")
    kept = [] if model.config.family.encoder_decoder else prompt
    if max_new_tokens <= 0:
        return kept
    decoding = Decoding(max_new_tokens=max_new_tokens, sampling=Sampling(temperature=temperature, top_k=top_k))
    [[generation]] = generate_batch(model, params, [prompt], decoding, rng=rng, eos_id=eos_id, batch_size=1)
    return kept + generation.tokens
