"""Masked-LM predictions: the most likely tokens at each `[MASK]` of a text, with probabilities.

The text is encoded as one document, `[CLS] ids [SEP]`, exactly as masked-LM training sees it
(data/objectives.py); the literal `[MASK]` in the text is the tokenizer's mask symbol.

A space just before `[MASK]` belongs to the mask: the tokenizer puts a word's leading space into its
piece (' sat'), so when training masked that piece the space went with it, and "the cat [MASK] on"
reads as training would have shown it, `the, ' cat', [MASK], ' on'`. Kept, the space would be a lone
' ' piece before the mask, a context training never shows there, and the model would rank pieces
that go on a word ('at') rather than words.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Candidate:
    token: str
    id: int
    probability: float


def encode_with_masks(tokenizer, text: str, max_len: int, *, option: str = "fill-mask --text",
                      ) -> tuple[np.ndarray, np.ndarray]:
    """([CLS] ids [SEP] as int32 [1, L], the indices of the masks). One-line errors, naming `option`
    (where the text came from), for a text the model cannot fill: no [MASK] in it, or longer than
    the model's positions."""
    if tokenizer.mask_id is None:
        raise ConfigError("this run's tokenizer has no [MASK] symbol: fill-mask needs a masked-LM run "
                          "(model.arch=bert)")
    pieces = tokenizer.encode(text.replace(" [MASK]", "[MASK]"))  # the mask takes its word's space (above)
    ids = np.asarray([tokenizer.cls_id, *pieces, tokenizer.sep_id], np.int32)
    masks = np.flatnonzero(ids == tokenizer.mask_id)
    if masks.size == 0:
        raise ConfigError(f"{option} holds no [MASK] to fill: {text!r}")
    if ids.size > max_len:
        raise ConfigError(f"{option} is {ids.size} tokens with [CLS] and [SEP]; the model reads at most "
                          f"{max_len} (model.max_len)")
    return ids[None, :], masks


@functools.partial(jax.jit, static_argnames=("model", "top_k", "vocab_size"))
def _top_k(model: nn.Module, params, ids_1L: jax.Array, masks_M: jax.Array, *, top_k: int, vocab_size: int):
    """The top_k (probability, id) at each mask, over the tokenizer's `vocab_size` ids: rows of a
    model.vocab_size larger than the tokenizer's are no token (no text to show, never a target)."""
    length = ids_1L.shape[1]
    logits_1LV = model.apply({"params": params}, ids_1L, positions=jnp.arange(length, dtype=jnp.int32)[None, :],
                             segment_ids=jnp.ones_like(ids_1L))
    probs_MV = jax.nn.softmax(logits_1LV[0, masks_M, :vocab_size].astype(jnp.float32), axis=-1)
    return jax.lax.top_k(probs_MV, top_k)


def check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise ConfigError(f"fill-mask --top-k must be positive, got {top_k}")


def fill_mask(model: nn.Module, params, tokenizer, text: str, *, top_k: int, max_len: int) -> list[list[Candidate]]:
    """For each [MASK] of `text`, in order, its `top_k` most likely tokens (most likely first)."""
    check_top_k(top_k)
    ids_1L, masks = encode_with_masks(tokenizer, text, max_len)
    top_k = min(top_k, tokenizer.vocab_size)
    probs_MK, ids_MK = jax.device_get(_top_k(model, params, jnp.asarray(ids_1L), jnp.asarray(masks), top_k=top_k,
                                                  vocab_size=tokenizer.vocab_size))
    return [[Candidate(tokenizer.decode([int(i)]), int(i), float(p)) for p, i in zip(probs_K, ids_K)]
            for probs_K, ids_K in zip(probs_MK, ids_MK)]


def describe(candidates: list[list[Candidate]]) -> str:
    """One line per mask: `[MASK] 1: 'range' 0.612 | 'len' 0.101 | ...`."""
    return "\n".join(f"[MASK] {n}: " + " | ".join(f"{c.token!r} {c.probability:.3f}" for c in mask)
                     for n, mask in enumerate(candidates, 1))
