"""Beam search (infer/beam_search.py) against exhaustive search and greedy decoding on tiny models."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from test_generate import model_with_drawn_params

from llm_jax.config import ModelConfig
from llm_jax.infer import beam_search
from llm_jax.infer.generate import Decoding, bucket_length, generate_batch, pad_prompts
from llm_jax.infer.sampling import Sampling

PROMPT = [1, 3]
NEW = 3


@functools.cache
def five_token_model():
    """A 5-token gpt2 with weights large enough for peaked, distinct distributions."""
    config = ModelConfig(arch="gpt2", vocab_size=5, n_layers=1, d_model=16, n_heads=2, d_ff=32, max_len=16)
    return model_with_drawn_params(config, seed=2, std=0.5)


def all_continuations_logprob(model, params) -> dict[tuple[int, ...], float]:
    """log p(continuation | PROMPT) of every NEW-token continuation, by one full forward pass each."""
    seqs = np.asarray(list(itertools.product(range(5), repeat=NEW)), np.int32)
    tokens = np.concatenate([np.tile(PROMPT, (len(seqs), 1)), seqs], axis=1)
    logprobs = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray(tokens)), axis=-1)
    start = len(PROMPT) - 1
    picked = np.take_along_axis(np.asarray(logprobs)[:, start:start + NEW], seqs[:, :, None], axis=-1)[..., 0]
    return {tuple(map(int, s)): float(v) for s, v in zip(seqs, picked.sum(axis=1))}


def run_beams(model, params, decoding, eos_id=None):
    rows = [PROMPT] * decoding.num_beams
    ids, real = pad_prompts(rows, bucket_length(len(PROMPT)), left=True)
    eos = jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32)
    return beam_search.search(model.config, params, jnp.asarray(ids), jnp.asarray(real), eos, decoding,
                              eos_id=eos_id)[0]


def test_beam_search_with_enough_beams_is_exhaustive_search_and_beats_greedy():
    """25 beams keep every 2-token prefix of a 5-token vocabulary: the 25 best 3-token continuations
    must be exactly the exhaustive ranking's, in order, with their log-probabilities; on this model
    greedy decoding misses the best one."""
    model, params = five_token_model()
    exhaustive = sorted(all_continuations_logprob(model, params).items(), key=lambda kv: -kv[1])
    decoding = Decoding(max_new_tokens=NEW, num_beams=25, num_return_sequences=25, length_penalty=0.0)
    beams = run_beams(model, params, decoding)
    assert [tuple(b.tokens) for b in beams] == [seq for seq, _ in exhaustive[:25]]
    np.testing.assert_allclose([b.logprob for b in beams], [v for _, v in exhaustive[:25]], rtol=1e-5)
    np.testing.assert_allclose([b.score for b in beams], [b.logprob for b in beams])  # length_penalty 0
    greedy = generate_batch(model, params, [PROMPT], Decoding(max_new_tokens=NEW, sampling=Sampling(temperature=0.0)),
                            rng=jax.random.key(0))[0][0]
    assert greedy.logprob < beams[0].logprob - 1e-2


def test_one_beam_is_greedy():
    model, params = five_token_model()
    greedy = generate_batch(model, params, [PROMPT], Decoding(max_new_tokens=NEW, sampling=Sampling(temperature=0.0)),
                            rng=jax.random.key(0))[0][0]
    [one] = run_beams(model, params, Decoding(max_new_tokens=NEW, num_beams=1))
    assert one.tokens == greedy.tokens
    np.testing.assert_allclose(one.logprob, greedy.logprob, rtol=1e-5)
