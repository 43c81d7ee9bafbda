"""`llm-jax bench CONFIG --decode`: how fast the compiled generation loop runs, on random prompts.

The model is the config's, with random parameters sharded over its mesh as training shards them; every row is a
prompt of `prompt_len` random ids, continued by exactly `new_tokens` tokens (no eos: the loop never
stops early). One timed call is the whole `generate` of a batch, prefill included, as Hugging Face's
`generate` is timed (scripts/decode_vs_torch.py); the median of `rounds` calls after a compiling one.

decode_tokens_per_sec = batch x new_tokens / seconds: new tokens of all rows. With beam search a row
is a prompt and its best beam (the other beams' tokens, computed too, are not counted).

`int8` (`--int8`, `--group-size`): the random weights quantized as `llm-jax quantize` quantizes a run
(infer/quantize.py), so float and int8 decoding are timed on the same model; `param_bytes` then counts
int8 values and float32 scales.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import Config, ConfigError
from llm_jax.infer import beam_search
from llm_jax.infer import generate as gen
from llm_jax.infer.sampling import Sampling
from llm_jax.models.decoder import count_params


def _param_bytes(params) -> int:
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params)))


def _random_params(setup):
    """Random parameters (normal, model.init_std) laid out as training lays them out (the state's
    shardings). Drawn on the host: compiling `init` would take longer than the timed calls, and the
    values change no cost (the loop never stops early)."""
    rng = np.random.default_rng(setup.config.seed)
    std = setup.config.model.init_std

    def draw(a):
        return jax.device_put(jnp.asarray(rng.standard_normal(a.shape) * std, a.dtype), a.sharding)

    return jax.tree.map(draw, setup.abstract_state.params)


def run_decode_bench(config: Config, *, batch: int = 1, num_beams: int = 1, prompt_len: int = 32,
                     new_tokens: int = 64, rounds: int = 3, int8: bool = False,
                     group_size: int | None = None) -> dict[str, Any]:
    from llm_jax.train import loop

    if config.model.family.encoder:
        raise ConfigError(f"bench --decode needs a decoder or an encoder-decoder, not model.arch={config.model.arch}")
    for name, value in (("--batch", batch), ("--num-beams", num_beams), ("--prompt-len", prompt_len),
                        ("--new-tokens", new_tokens), ("--rounds", rounds)):
        if value < 1:
            raise ConfigError(f"bench {name} must be positive, got {value}")
    try:
        gen.check_fits(config.model, prompt_len, new_tokens)
    except ValueError as e:
        raise ConfigError(f"bench --decode: {e}") from None
    if group_size is not None and not int8:
        raise ConfigError("bench --group-size quantizes the weights: add --int8")
    setup = loop.build(config, with_data=False)
    params = _random_params(setup)
    n_params = count_params(params)
    if int8:
        from llm_jax.infer import quantize

        params = quantize.quantize_params(params, config.model, group_size)
    decoding = gen.Decoding(max_new_tokens=new_tokens, sampling=Sampling(temperature=0.0), num_beams=num_beams)
    rng = np.random.default_rng(config.seed)
    prompts = rng.integers(4, config.model.vocab_size, size=(batch, prompt_len)).tolist()
    rows = [p for p in prompts for _ in range(num_beams)]
    ids, real = gen.pad_prompts(rows, prompt_len, left=not config.model.family.encoder_decoder)
    ids, real, eos = jnp.asarray(ids), jnp.asarray(real), jnp.asarray(-1, jnp.int32)

    def call():
        if num_beams > 1:
            return beam_search.search_rows(config.model, params, ids, real, eos, decoding=decoding)
        return gen.sample_rows(config.model, params, ids, real, jax.random.key(0), eos, decoding=decoding)

    with setup.context(split_batch=False):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        compile_time = time.perf_counter() - t0
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    device = jax.devices()[0]
    return {
        "decode_tokens_per_sec": batch * new_tokens / seconds,
        "seconds_per_call": seconds,
        "compile_and_first_call_s": compile_time,
        "batch": batch, "num_beams": num_beams, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "weights": f"int8 (group size {group_size or 'per channel'})" if int8 else "float",
        "params": n_params,
        "param_bytes": _param_bytes(params),  # read once per step: the batch-1 bound's numerator
        "device": f"{jax.device_count()}x {getattr(device, 'device_kind', device.platform)}",
    }
