"""Corruption of token ids on the host, as pure numpy functions of the caller's rng: masked LM
(BERT's 80/10/10, below) and span corruption (T5's, further down).

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
#
# T5's pretraining task: a few spans of a piece are dropped from the encoder's inputs, each replaced
# by its own sentinel (<extra_id_0>, <extra_id_1>, ... in order), and the decoder learns to write
# them out, each after its sentinel:
#     piece    a b c d e f g h
#     inputs   a <0> d e f <1> h [eos]       (noise spans "b c" and "g")
#     targets  <0> b c <1> g [eos]
# Which tokens are noise follows T5's `random_spans_noise_mask` (t5/data/preprocessors.py): exactly
# round(n * density) noise tokens (at least 1 and at most n - 1, for a piece of n >= 2), in
# round(noise / mean span length) spans (at least 1, at most as many as the kept tokens allow); the
# lengths of the noise spans and of the kept spans between them are uniform random compositions,
# and the piece starts with kept tokens and ends with a noise span. So the lengths of both sides are
# a function of n alone (`corrupted_lengths`), which is what lets full pieces fill train.seq_len and
# Config.target_len exactly. A piece of one token has no noise: inputs [token, eos], targets [eos].

NOISE_DENSITY = 0.15  # share of a piece's tokens that are dropped into the targets
MEAN_SPAN_LENGTH = 3.0  # mean length of a dropped span


def noise_counts(tokens: int, noise_density: float = NOISE_DENSITY,
                 mean_span_length: float = MEAN_SPAN_LENGTH) -> tuple[int, int]:
    """(noise tokens, noise spans) of a piece of `tokens` ids: see the comment above."""
    if tokens < 2:
        return 0, 0
    noise = min(max(int(round(tokens * noise_density)), 1), tokens - 1)
    spans = min(max(int(round(noise / mean_span_length)), 1), tokens - noise)
    return noise, spans


def corrupted_lengths(tokens: int, noise_density: float = NOISE_DENSITY,
                      mean_span_length: float = MEAN_SPAN_LENGTH) -> tuple[int, int]:
    """(inputs, targets) lengths after span corruption of a piece of `tokens` ids.

    The inputs keep the ids that are not noise plus one sentinel per span, the targets hold the
    noise plus one sentinel per span, and each side ends in EOS. Both grow with `tokens` (never
    shrink), so a piece shorter than a full one always fits where the full one does.
    """
    noise, spans = noise_counts(tokens, noise_density, mean_span_length)
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


def span_piece_length(inputs_length: int, targets_length: int, noise_density: float = NOISE_DENSITY,
                      mean_span_length: float = MEAN_SPAN_LENGTH) -> int:
    """The longest piece whose corrupted inputs fit `inputs_length` and targets `targets_length`
    (train.seq_len and Config.target_len: a target_len set below the derived one shortens the
    pieces rather than cutting targets). At least 1."""
    tokens = 1
    while all(got <= limit for got, limit in zip(corrupted_lengths(tokens + 1, noise_density, mean_span_length),
                                                  (inputs_length, targets_length))):
        tokens += 1
    return tokens


def span_targets_used(inputs_length: int, targets_length: int, noise_density: float = NOISE_DENSITY,
                      mean_span_length: float = MEAN_SPAN_LENGTH) -> int:
    """The targets of the longest piece (`span_piece_length`): at most `targets_length`, fewer when the
    inputs are full first (a train.target_len above the derived one leaves the rest of each row padding)."""
    tokens = span_piece_length(inputs_length, targets_length, noise_density, mean_span_length)
    return corrupted_lengths(tokens, noise_density, mean_span_length)[1]


def _random_segmentation(items: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `segments` non-empty runs that add up to `items`, uniform over all such
    compositions (T5's `_random_segmentation`): the cuts are a uniform sample of the items - 1 gaps."""
    cuts = np.sort(rng.choice(items - 1, size=segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [items]]))


def random_spans_noise_mask(tokens: int, rng: np.random.Generator, noise_density: float = NOISE_DENSITY,
                            mean_span_length: float = MEAN_SPAN_LENGTH) -> np.ndarray:
    """bool [tokens]: True on the noise; kept and noise spans alternate, starting with a kept one."""
    noise, spans = noise_counts(tokens, noise_density, mean_span_length)
    if spans == 0:
        return np.zeros(tokens, bool)
    noise_lengths = _random_segmentation(noise, spans, rng)
    kept_lengths = _random_segmentation(tokens - noise, spans, rng)
    run_lengths = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), run_lengths)


def span_corrupt(ids: Sequence[int] | np.ndarray, rng: np.random.Generator, *, sentinel_ids: Sequence[int],
                 eos_id: int, noise_density: float = NOISE_DENSITY, mean_span_length: float = MEAN_SPAN_LENGTH,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs int32, targets int32) of one piece `ids` (1-D): see the comment above.

    Span i is marked by sentinel_ids[i]; a piece with more spans than sentinels is a ValueError (the
    config refuses a train.seq_len whose pieces would need more than tokenizer.extra_ids).
    """
    ids = np.asarray(ids, dtype=np.int32).reshape(-1)
    noise = random_spans_noise_mask(len(ids), rng, noise_density, mean_span_length)
    starts = noise & ~np.concatenate([[False], noise[:-1]])  # the first token of each noise span
    spans = int(starts.sum())
    if spans > len(sentinel_ids):
        raise ValueError(f"a piece of {len(ids)} ids has {spans} noise spans but there are only "
                         f"{len(sentinel_ids)} sentinels")
    sentinels = np.asarray(sentinel_ids[:spans], dtype=np.int32)
    # Inputs: the kept ids; each span's first token becomes its sentinel, the rest of the span goes.
    inputs = ids.copy()
    inputs[starts] = sentinels
    inputs = inputs[~noise | starts]
    # Targets: the noise ids, each span preceded by its sentinel.
    targets = np.insert(ids[noise], np.flatnonzero(starts[noise]), sentinels)
    eos = np.asarray([eos_id], np.int32)
    return np.concatenate([inputs, eos]).astype(np.int32), np.concatenate([targets, eos]).astype(np.int32)
