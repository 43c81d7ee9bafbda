"""Sampling with the KV cache against full forward passes: decoders (the prompt prefilled) and the
encoder-decoder (the prompt encoded once, the targets decoded from the start id)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import ModelConfig
from llm_jax.infer.generate import DECODER_START_ID, generate
from llm_jax.infer.sampling import Sampling, choose
from llm_jax.models.build import init_inputs, make_model

PROMPT = [5, 17, 3, 42]
NEW = 8
LENGTH = len(PROMPT) + NEW  # of the reference passes' inputs: one compile each


def tiny(arch: str, **overrides) -> ModelConfig:
    values = dict(arch=arch, vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_len=16)
    if arch == "llama":
        values.update(n_kv_heads=2, scan_layers=True)
    values.update(overrides)
    return ModelConfig(**values)


def model_with_drawn_params(config: ModelConfig, seed: int, std: float):
    """The family's model and params drawn with numpy (normal * std): compiling `init` is slow on CPU.
    test_beam_search.py draws its model with it too."""
    model = make_model(config)
    tokens, extra = init_inputs(config, 8)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, **extra))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * std, s.dtype),
                          nn.unbox(abstract["params"]))
    return model, params


@functools.cache
def setup(arch: str):
    """Model, numpy-drawn params (compiling `init` is slow on CPU) and a jitted full forward pass: of
    the whole text for a decoder; for an encoder-decoder, of its decoder's inputs with PROMPT as the
    encoder's (teacher forcing)."""
    config = tiny(arch)
    model, params = model_with_drawn_params(config, seed=0, std=0.1)
    if config.family.encoder_decoder:
        full = jax.jit(lambda tokens: model.apply({"params": params}, tokens, encoder_tokens=jnp.asarray([PROMPT])))
    else:
        full = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    return model, params, full


def reference_logits(arch: str, ids: list[int]) -> np.ndarray:
    """Next-token logits after `ids` by a full forward pass, no cache. The input is padded to a
    fixed length (one compile); causality keeps the padding out of the logits we read. An
    encoder-decoder's `ids` are the targets so far, which its decoder reads after the start id."""
    model, _, full = setup(arch)
    if model.config.family.encoder_decoder:
        ids = [DECODER_START_ID, *ids]
    padded = np.zeros((1, LENGTH), np.int32)
    padded[0, :len(ids)] = ids
    return np.asarray(full(jnp.asarray(padded)))[0, len(ids) - 1]


def prefix(arch: str) -> list[int]:
    """What generate returns before the new ids: a decoder's prompt; nothing for an encoder-decoder."""
    return [] if tiny(arch).family.encoder_decoder else list(PROMPT)


@functools.cache
def greedy_reference(arch: str) -> list[int]:
    ids = prefix(arch)
    for _ in range(NEW):
        ids.append(int(np.argmax(reference_logits(arch, ids))))
    return ids


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_greedy_generation_matches_full_forward_argmax(arch):
    model, params, _ = setup(arch)
    out = generate(model, params, PROMPT, max_new_tokens=NEW, rng=jax.random.key(0), temperature=0.0)
    expected = greedy_reference(arch)
    assert len(set(expected[len(prefix(arch)):])) > 1  # a continuation that could be got wrong
    assert out == expected
    # numpy prompts are accepted too.
    assert generate(model, params, np.asarray(PROMPT), max_new_tokens=NEW, rng=jax.random.key(1),
                    temperature=0.0) == expected


def test_top_k_1_equals_greedy():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((16, 64)), jnp.float32)
    sample = jax.jit(choose, static_argnums=2)
    greedy = sample(logits, jax.random.key(0), Sampling(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(greedy), np.argmax(np.asarray(logits), axis=-1))
    for seed in range(3):
        top1 = sample(logits, jax.random.key(seed), Sampling(temperature=1.0, top_k=1))
        np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
    # Without top_k, temperature 1 draws other ids too.
    assert not np.array_equal(np.asarray(sample(logits, jax.random.key(0), Sampling(temperature=1.0))),
                              np.asarray(greedy))


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_generation_stops_at_eos_and_includes_it(arch):
    model, params, _ = setup(arch)
    expected = greedy_reference(arch)
    continuation = expected[len(prefix(arch)):]
    eos = continuation[2]
    stop = continuation.index(eos)  # its first occurrence
    out = generate(model, params, PROMPT, max_new_tokens=NEW, rng=jax.random.key(0), temperature=0.0, eos_id=eos)
    assert out == prefix(arch) + continuation[:stop + 1]
    assert len(out) < len(expected)


def test_top_k_sampling_stays_in_the_top_k_and_depends_on_the_rng():
    model, params, _ = setup("llama")
    samples = [generate(model, params, PROMPT, max_new_tokens=NEW, rng=jax.random.key(seed), temperature=2.0,
                        top_k=3) for seed in (0, 1)]
    assert samples[0] != samples[1]
    for ids in samples:
        assert ids[:len(PROMPT)] == PROMPT and len(ids) == len(PROMPT) + NEW
        for t in range(len(PROMPT), len(ids)):
            top3 = np.argsort(reference_logits("llama", ids[:t]))[-3:]
            assert ids[t] in top3


def test_choose_modes():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0]])
    assert int(choose(logits, jax.random.key(0), Sampling(temperature=0.0))[0]) == 1
    draws = {int(choose(logits, jax.random.key(s), Sampling(temperature=5.0, top_k=2))[0]) for s in range(20)}
    assert draws == {1, 3}


def test_rejects_what_the_model_cannot_do():
    model, params, _ = setup("gpt2")
    with pytest.raises(ValueError, match="max_len"):
        generate(model, params, PROMPT, max_new_tokens=20, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="prompt"):
        generate(model, params, [], max_new_tokens=2, rng=jax.random.key(0))
    assert generate(model, params, PROMPT, max_new_tokens=0, rng=jax.random.key(0)) == PROMPT


class _DigitTokenizer:
    """Each character is one token (its digit value + 10); enough to drive `loop.sample_text`."""

    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [10 + int(ch) for ch in text]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def test_sample_text_says_when_it_generates_fewer_tokens_than_asked(caplog):
    from llm_jax.config import Config
    from llm_jax.parallel import mesh as mesh_lib
    from llm_jax.train import loop

    model, params, _ = setup("gpt2")
    config = Config(model=model.config)
    bare = loop.Setup(config=config, workdir=None, mesh=mesh_lib.make_mesh(config), model=model, tx=None,
                      schedule=None, abstract_state=None, state_shardings=None, tokenizer=_DigitTokenizer(),
                      sources=None)
    with caplog.at_level("WARNING"):
        text = loop.sample_text(bare, params, "1234", max_new_tokens=100, temperature=0.0, top_k=0, seed=0)
    # bos + 4 prompt tokens leave 11 of the model's 16 positions.
    assert len(text.split()) - 4 <= 11
    assert "generating 11 new tokens, not the 100 asked" in caplog.text


PROMPTS = [[5, 17, 3, 42], [7], [9, 8, 7, 6, 5, 4, 11]]  # lengths 4, 1, 7: left padding differs per row


@functools.cache
def _alone(arch: str):
    """A jitted full forward pass of one unpadded prompt: of a decoder's whole text, or of an
    encoder-decoder's decoder inputs (padded to LENGTH, causal) with the prompt as its encoder's input."""
    model, params, _ = setup(arch)
    if model.config.family.encoder_decoder:
        return jax.jit(lambda decoder_BL, encoder_BS: model.apply({"params": params}, decoder_BL,
                                                                  encoder_tokens=encoder_BS))
    return jax.jit(lambda tokens_BL: model.apply({"params": params}, tokens_BL))


def next_logits_alone(arch: str, prompt: list[int], generated: list[int]) -> np.ndarray:
    if tiny(arch).family.encoder_decoder:
        decoder_L = np.zeros(LENGTH, np.int32)
        decoder_L[:len(generated) + 1] = [DECODER_START_ID, *generated]
        return np.asarray(_alone(arch)(decoder_L[None], np.asarray([prompt], np.int32)))[0, len(generated)]
    return np.asarray(_alone(arch)(np.asarray([prompt + generated], np.int32)))[0, -1]


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_batched_greedy_equals_each_prompt_alone(arch):
    """Left padding (a decoder's prompt; an encoder-decoder's encoder input, masked by its segment
    ids) leaves each row's continuation, and its log-probability, as they are alone: by full forward
    passes of the prompt alone, no padding (unmasked, the padding moves the log-probabilities by far
    more than the tolerance)."""
    from llm_jax.infer.generate import Decoding, generate_batch

    model, params, _ = setup(arch)
    decoding = Decoding(max_new_tokens=5, sampling=Sampling(temperature=0.0))
    batched = [gens[0] for gens in generate_batch(model, params, PROMPTS, decoding, rng=jax.random.key(0),
                                                  batch_size=4)]
    for prompt, generation in zip(PROMPTS, batched):
        generated, logprob = [], 0.0
        for _ in range(5):
            logits = next_logits_alone(arch, list(prompt), generated).astype(np.float64)
            generated.append(int(np.argmax(logits)))
            logprob += logits[generated[-1]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        assert generation.tokens == generated
        assert generation.logprob == pytest.approx(logprob, rel=1e-5)
    # Different prompts, different continuations: the check would notice rows mixed up or padding seen.
    assert len({round(g.logprob, 4) for g in batched}) == len(PROMPTS)
