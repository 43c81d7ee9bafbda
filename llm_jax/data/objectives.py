"""Masked-LM corruption of token ids (BERT's 80/10/10), on the host, as a pure numpy function.

The model learns to recover the original token at a few selected positions from the corrupted
inputs. The batch keeps the decoder's layout (data/pipeline.py): `inputs` are the corrupted ids,
`targets` the original ids, and `weights` is 1 exactly on the selected positions, so the same
`cross_entropy_sum(logits, targets, weights)` counts only them.

How the selection is drawn, per piece (a `[CLS] chunk [SEP]` of at most seq_len ids):
- Candidates are the ids that are not special (pad, unk, bos, eos, [CLS], [SEP], [MASK], user
  symbols): a special id is never selected and never the target of the loss.
- The count is `rate * candidates` rounded stochastically (floor, plus one with probability equal
  to the fraction): an exact share on average, whatever the piece length (always rounding up, or
  "at least one", would select more than 15% of short pieces), and no piece strays from it by a
  whole token. A piece may get no selected position; its weight is then 0 and the loss, normalised
  by the weights, is not skewed.
- The positions are a uniform sample without replacement among the candidates.
- Each selected position independently becomes [MASK] with probability 0.8, a random non-special
  id (uniform over the tokenizer's other ids) with 0.1, or stays itself with 0.1.

The rng is the caller's: the pipeline derives it from the seed and the document's place in the
data stream, so a resumed run sees the masks of an uninterrupted one (data/pipeline.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MASK_RATE = 0.15
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the selected; the rest keeps its token


def random_regular_ids(rng: np.random.Generator, size: int, vocab_size: int, special_ids: np.ndarray) -> np.ndarray:
    """`size` ids drawn uniformly from [0, vocab_size) without the (sorted, distinct) `special_ids`.

    Draws from the vocab_size - len(special_ids) regular ids and shifts each draw past the special
    ids at or below it (ascending), without building the list of regular ids.
    """
    ids = rng.integers(0, vocab_size - len(special_ids), size=size)
    for special in special_ids:
        ids += ids >= special
    return ids


def mask_tokens(ids: Sequence[int] | np.ndarray, rng: np.random.Generator, *, mask_id: int, vocab_size: int,
                special_ids: Sequence[int] | np.ndarray, rate: float = MASK_RATE,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs int32, targets int32, weights float32) of one piece `ids` (1-D): see the module docstring.

    `vocab_size` is the tokenizer's (random replacements stay inside it); `special_ids` must hold
    pad and every id that must never be selected or inserted (`mask_id` is added to them).
    """
    targets = np.asarray(ids, dtype=np.int32).copy()
    special = np.unique(np.append(np.asarray(special_ids, dtype=np.int64), mask_id))
    inputs = targets.copy()
    weights = np.zeros(targets.shape, np.float32)
    candidates = np.flatnonzero(~np.isin(targets, special))
    count = int(np.floor(rate * len(candidates) + rng.random()))
    if count == 0:
        return inputs, targets, weights
    selected = rng.choice(candidates, size=count, replace=False)
    weights[selected] = 1.0
    action = rng.random(count)
    to_mask = action < MASK_SHARE
    to_random = (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)
    inputs[selected[to_mask]] = mask_id
    inputs[selected[to_random]] = random_regular_ids(rng, int(to_random.sum()), vocab_size, special)
    return inputs, targets, weights


# ----------------------------------------------------------------------------- span corruption (T5)

NOISE_DENSITY = 0.15  # share of a piece's tokens that are dropped into the targets
MEAN_SPAN_LENGTH = 3.0  # mean length of a dropped span


def corrupted_lengths(tokens: int, noise_density: float = NOISE_DENSITY,
                      mean_span_length: float = MEAN_SPAN_LENGTH) -> tuple[int, int]:
    """(inputs, targets) lengths after span corruption of a piece of `tokens` ids.

    The noise is round(tokens * density) ids in round(noise / mean span) spans (at least one). The
    inputs keep the other ids plus one sentinel per span, the targets hold the noise plus one
    sentinel per span, and each side ends in EOS.
    """
    noise = int(round(tokens * noise_density))
    spans = max(1, int(round(noise / mean_span_length)))
    return tokens - noise + spans + 1, noise + spans + 1


def span_lengths(inputs_length: int, noise_density: float = NOISE_DENSITY,
                 mean_span_length: float = MEAN_SPAN_LENGTH) -> tuple[int, int]:
    """(piece length, target length) for span corruption whose inputs fill `inputs_length`.

    The longest piece whose corrupted inputs still fit in inputs_length, so a packed row of full
    pieces fills train.seq_len; the target length is that piece's targets (T5: inputs 512 -> pieces
    of 568 ids, targets 114).
    """
    tokens = 1
    while corrupted_lengths(tokens + 1, noise_density, mean_span_length)[0] <= inputs_length:
        tokens += 1
    return tokens, corrupted_lengths(tokens, noise_density, mean_span_length)[1]

