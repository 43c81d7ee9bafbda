"""Log-likelihoods of texts: the basis of benchmark harnesses (lm-eval's `loglikelihood` and
`loglikelihood_rolling`) and of `llm-jax eval --input`'s bits per byte.

- A decoder scores a continuation's tokens given the context's: one row `[bos] context continuation`,
  the continuation's positions summed. `loglikelihood` encodes context and continuation apart, so the
  continuation's ids are those it has alone (lm-eval's adapter, commands/lm_eval_model.py, splits the
  ids of the whole text instead, as lm-eval's Hugging Face models do, and calls `score_ids`); a row
  longer than the model's positions loses context from the left.
- An encoder-decoder reads the context as its encoder input (`context [eos]`, as training's inputs)
  and scores the continuation as its target, decoded from the start id 0.

`is_greedy`: every continuation token is the argmax of its position (lm-eval's second answer).
Rows are batched `batch_size` at a time, their lengths bucketed (generate.bucket_length) and the
last batch filled, so a list of requests compiles a few programs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.infer.generate import bucket_length

LN2 = math.log(2.0)


@functools.partial(jax.jit, static_argnames=("model",))
def _decoder_scores(model: nn.Module, params, inputs_BL, targets_BL, segment_ids_BL):
    """Per position: (log p(target) float32 [B, L], target == argmax [B, L])."""
    positions_BL = jnp.broadcast_to(jnp.arange(inputs_BL.shape[1], dtype=jnp.int32), inputs_BL.shape)
    logits_BLV = model.apply({"params": params}, inputs_BL, positions_BL, segment_ids_BL)
    return _pick(logits_BLV, targets_BL)


@functools.partial(jax.jit, static_argnames=("model",))
def _encoder_decoder_scores(model: nn.Module, params, encoder_BS, encoder_segment_ids_BS, inputs_BL, targets_BL,
                            segment_ids_BL):
    logits_BLV = model.apply({"params": params}, inputs_BL, segment_ids=segment_ids_BL, encoder_tokens=encoder_BS,
                             encoder_segment_ids=encoder_segment_ids_BS)
    return _pick(logits_BLV, targets_BL)


def _pick(logits_BLV, targets_BL):
    logprobs_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    picked_BL = jnp.take_along_axis(logprobs_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return picked_BL, jnp.argmax(logits_BLV, axis=-1) == targets_BL


def _rows(pairs: Sequence[tuple[list[int], list[int]]], batch_size: int):
    """Chunks of `batch_size` pairs, the last filled with copies of its first (one shape per bucket)."""
    batch_size = min(batch_size, len(pairs))
    for first in range(0, len(pairs), batch_size):
        chunk = list(pairs[first:first + batch_size])
        yield chunk, chunk + [chunk[0]] * (batch_size - len(chunk))


def score_ids(model: nn.Module, params, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 8,
              max_len: int | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation ids), all greedy) per (context ids, continuation ids) pair.

    Decoders: the context ids come first in the row (the caller adds bos); at most `max_len`
    (default model.max_len) inputs, context cut from the left. Encoder-decoders: the context ids
    are the encoder's input, the continuation its target."""
    config = model.config
    max_len = max_len or config.max_len
    if any(not cont for _, cont in pairs):
        raise ValueError("a continuation of no tokens has no likelihood to score")
    results = []
    for chunk, filled in _rows(pairs, batch_size):
        if config.family.encoder_decoder:
            picked, greedy, mask = _score_encoder_decoder(model, params, filled, max_len)
        else:
            picked, greedy, mask = _score_decoder(model, params, filled, max_len)
        for r in range(len(chunk)):
            results.append((float(picked[r][mask[r]].sum()), bool(greedy[r][mask[r]].all())))
    return results


def _score_decoder(model, params, pairs, max_len):
    rows = []
    for context, cont in pairs:
        row = (list(context) + list(cont))[-(max_len + 1):]
        if len(row) - 1 < len(cont):
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's {max_len} positions")
        rows.append((row, len(cont)))
    length = min(bucket_length(max(len(r) - 1 for r, _ in rows)), max_len)
    inputs, targets = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), np.int32)
    segments, mask = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), bool)
    for b, (row, n_cont) in enumerate(rows):
        n = len(row) - 1
        inputs[b, :n], targets[b, :n], segments[b, :n] = row[:-1], row[1:], 1
        mask[b, n - n_cont:n] = True
    picked, greedy = jax.device_get(_decoder_scores(model, params, jnp.asarray(inputs), jnp.asarray(targets),
                                                    jnp.asarray(segments)))
    return picked, greedy, mask


def _score_encoder_decoder(model, params, pairs, max_len):
    from llm_jax.infer.generate import DECODER_START_ID, pad_prompts

    encoder = [list(context)[-max_len:] for context, _ in pairs]
    targets = [list(cont) for _, cont in pairs]
    if any(len(t) > max_len for t in targets):
        raise ValueError(f"a continuation longer than the decoder's {max_len} positions")
    enc_ids, enc_real = pad_prompts(encoder, bucket_length(max(map(len, encoder))), left=False)
    length = bucket_length(max(map(len, targets)))
    tgt_ids, tgt_real = pad_prompts(targets, length, left=False)
    inputs = np.pad(tgt_ids[:, :-1], ((0, 0), (1, 0)), constant_values=DECODER_START_ID)
    picked, greedy = jax.device_get(_encoder_decoder_scores(
        model, params, jnp.asarray(enc_ids), jnp.asarray(enc_real), jnp.asarray(inputs), jnp.asarray(tgt_ids),
        jnp.asarray(tgt_real)))
    return picked, greedy, tgt_real.astype(bool)


def context_ids(tokenizer, context: str, encoder_decoder: bool) -> list[int]:
    """A context's ids as the model reads them (decoders: after bos; encoder-decoders: ended by eos)."""
    ids = tokenizer.encode(context) if context else []
    return ids + [tokenizer.eos_id] if encoder_decoder else [tokenizer.bos_id] + ids


def loglikelihood(model: nn.Module, params, tokenizer, requests: Sequence[tuple[str, str]], *,
                  batch_size: int = 8) -> list[tuple[float, bool]]:
    """(log p(continuation | context) in nats, whether greedy decoding would produce it) per
    (context, continuation) pair, in order. `params` unboxed; call under the run's mesh context
    (loop.Setup.context) for a sharded model."""
    encoder_decoder = model.config.family.encoder_decoder
    pairs = [(context_ids(tokenizer, c, encoder_decoder), tokenizer.encode(x)) for c, x in requests]
    return score_ids(model, params, pairs, batch_size=batch_size)


def rolling_windows(ids: list[int], max_len: int, *, encoder_decoder: bool,
                    bos_id: int) -> list[tuple[list[int], list[int]]]:
    """Every token of `ids` scored once, in windows of at most max_len predicted tokens each given
    the one token before it (bos before the first; lm-eval's rolling windows, context_len 1, except
    that lm-eval gives a short last window the full row of context before it).
    An encoder-decoder's windows are targets with an empty input."""
    pairs = []
    for start in range(0, len(ids), max_len):
        window = ids[start:start + max_len]
        if encoder_decoder:
            pairs.append(([], window))
        else:
            pairs.append(([bos_id] if start == 0 else [ids[start - 1]], window))
    return pairs


def loglikelihood_rolling(model: nn.Module, params, tokenizer, texts: Sequence[str], *,
                          batch_size: int = 8) -> list[float]:
    """log p(text) in nats of each whole text (perplexity's numerator), in windows of the model's
    length."""
    config = model.config
    per_text = [rolling_windows(tokenizer.encode(t), config.max_len, encoder_decoder=config.family.encoder_decoder,
                                bos_id=tokenizer.bos_id) for t in texts]
    if config.family.encoder_decoder:
        per_text = [[([tokenizer.eos_id], w) for _, w in windows] for windows in per_text]
    flat = [p for windows in per_text for p in windows]
    scores = iter(score_ids(model, params, flat, batch_size=batch_size)) if flat else iter(())
    return [sum(next(scores)[0] for _ in windows) for windows in per_text]


def text_report(model: nn.Module, params, tokenizer, texts: Sequence[str], *, batch_size: int = 8) -> dict[str, float]:
    """eval_loss (nats per token), eval_perplexity and bits_per_byte (summed nats / ln 2 / the texts'
    UTF-8 bytes: comparable across tokenizers) of whole texts, and the counts behind them."""
    logprobs = loglikelihood_rolling(model, params, tokenizer, texts, batch_size=batch_size)
    tokens = sum(len(tokenizer.encode(t)) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    nats = -sum(logprobs)
    loss = nats / max(tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": nats / LN2 / max(n_bytes, 1), "tokens": tokens, "bytes": n_bytes}


def read_texts(path: str, text_key: str = "text") -> list[str]:
    """A text file as one text; a JSONL file (*.jsonl) as the `text_key` field of each line."""
    import json
    from pathlib import Path

    from llm_jax.config import ConfigError

    raw = Path(path).read_text(encoding="utf-8")
    if not str(path).endswith(".jsonl"):
        return [raw]
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise ConfigError(f"eval --input {path}:{n} has no {text_key!r} string field (--text-key)")
        texts.append(record[text_key])
    if not texts:
        raise ConfigError(f"eval --input {path} holds no text")
    return texts


def bits_per_byte(eval_loss: float, batches, tokenizer) -> float:
    """Held-out bits per byte: the mean loss times the weighted targets (summed nats) / ln 2 / the
    bytes of text those targets stand for (Tokenizer.piece_bytes)."""
    sizes = tokenizer.piece_bytes()
    weight = sum(float(np.sum(b["weights"])) for b in batches)
    n_bytes = sum(float(np.sum(sizes[np.asarray(b["targets"])] * np.asarray(b["weights"]))) for b in batches)
    return eval_loss * weight / LN2 / max(n_bytes, 1.0)
