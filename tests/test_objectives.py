"""Tests of llm_jax.data.objectives and the masked-LM data path of data/pipeline.py and data/shards.py:
80/10/10 masking statistics, [CLS] ... [SEP] pieces packed with their weights, masks fixed by the
seed and the data position (resume, process layout, epochs), and clm batches as before."""

import collections
import json

import grain
import numpy as np
import pytest
from test_data import (
    BATCH,
    SEQ,
    ToyTokenizer,
    check_batch,
    encdec_examples,
    expected_pairs,
    toy_config,
    toy_docs,
    toy_sources,
)

from llm_jax.config import ConfigError
from llm_jax.data import objectives, pipeline, shards

CLS, SEP, MASK = 4, 5, 6
VOCAB = 1000
SPECIAL = (0, 1, 2, 3, CLS, SEP, MASK)


class MlmTokenizer(ToyTokenizer):
    """ToyTokenizer (documents are space-separated ids) with the masked-LM symbols of a real one."""

    cls_id, sep_id, mask_id = CLS, SEP, MASK
    special_ids = SPECIAL
    vocab_size = 1_000_000


def _mlm_config(*extra):
    return toy_config("model.arch=bert", *extra)


# ----------------------------------------------------------------------------- mask_tokens


def test_masking_selects_15_percent_of_real_tokens_split_80_10_10():
    rng = np.random.default_rng(0)
    data_rng = np.random.default_rng(1)
    real = selected = masked = kept = replaced = 0
    while real < 100_000:
        length = int(data_rng.integers(0, 31))
        ids = data_rng.integers(7, VOCAB, size=length)
        # Special ids inside the text too (unk, bos, [MASK] typed by a user), and padding at the end.
        ids[data_rng.random(length) < 0.05] = data_rng.choice([1, 2, 3, MASK])
        piece = np.concatenate([[CLS], ids, [SEP], np.zeros(int(data_rng.integers(0, 3)), np.int64)])
        inputs, targets, weights = objectives.mask_tokens(piece, rng, mask_id=MASK, vocab_size=VOCAB,
                                                          special_ids=SPECIAL)
        assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
        np.testing.assert_array_equal(targets, piece)  # targets are the original tokens
        special = np.isin(piece, SPECIAL)
        assert not weights[special].any()  # never a special or pad token
        np.testing.assert_array_equal(inputs[weights == 0], piece[weights == 0])  # unselected: unchanged
        chosen = weights == 1
        assert set(np.unique(weights)) <= {0.0, 1.0}
        new = inputs[chosen]
        swapped = (new != MASK) & (new != targets[chosen])
        assert not np.isin(new[swapped], SPECIAL).any() and (new < VOCAB).all()  # random ids are regular
        real += int((~special).sum())
        selected += int(chosen.sum())
        masked += int((new == MASK).sum())
        kept += int((new == targets[chosen]).sum())
        replaced += int(swapped.sum())
    assert abs(selected / real - 0.15) < 0.01
    # A random id equal to the original counts as kept: 1 in ~1000 of the 10%, far below 1%.
    assert abs(masked / selected - 0.8) < 0.01
    assert abs(replaced / selected - 0.1) < 0.01
    assert abs(kept / selected - 0.1) < 0.01


def test_masking_is_a_function_of_the_rng_and_spares_pieces_without_real_tokens():
    piece = np.arange(7, 107)
    a = objectives.mask_tokens(piece, np.random.default_rng(5), mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL)
    b = objectives.mask_tokens(piece, np.random.default_rng(5), mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL)
    c = objectives.mask_tokens(piece, np.random.default_rng(6), mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], c[2])
    only_special = np.asarray([CLS, SEP, 0, 0])
    inputs, _, weights = objectives.mask_tokens(only_special, np.random.default_rng(0), mask_id=MASK,
                                                vocab_size=VOCAB, special_ids=SPECIAL)
    assert not weights.any() and inputs.tolist() == only_special.tolist()
    drawn = objectives.random_regular_ids(np.random.default_rng(0), 20_000, 12, np.asarray([0, 3, 4, 11]))
    assert sorted(set(drawn.tolist())) == [1, 2, 5, 6, 7, 8, 9, 10]  # every regular id, no special


# ----------------------------------------------------------------------------- pieces and packing


def _segments(batch):
    """(inputs, targets, weights, positions) of every packed piece of a batch."""
    out = []
    seg = batch["segment_ids"]
    for r in range(seg.shape[0]):
        for s in sorted(set(seg[r][seg[r] > 0].tolist())):
            where = seg[r] == s
            out.append(tuple(batch[k][r][where] for k in ("inputs", "targets", "weights", "positions")))
    return out


def test_pieces_are_cls_chunk_sep_and_packing_carries_their_weights():
    assert [p.tolist() for p in pipeline.masked_pieces(list(range(10, 17)), 5, CLS, SEP)] == [
        [CLS, 10, 11, 12, SEP], [CLS, 13, 14, 15, SEP], [CLS, 16, SEP]]
    assert pipeline.masked_pieces([], 5, CLS, SEP) == []
    docs = toy_docs(25)
    config = _mlm_config("train.eval_batches=1000")
    batches = pipeline.make_eval_batches(config, MlmTokenizer(), toy_sources(["1"], docs))
    ids, selected = collections.Counter(), 0
    for batch in batches:
        assert set(batch) == set(pipeline.BATCH_KEYS) and batch["weights"].dtype == np.float32
        pad = batch["segment_ids"] == 0
        assert not batch["weights"][pad].any() and not batch["inputs"][pad].any()
        for inputs, targets, weights, positions in _segments(batch):
            assert len(targets) <= SEQ and targets[0] == CLS and targets[-1] == SEP
            np.testing.assert_array_equal(positions, np.arange(len(targets)))  # restarts per piece
            assert weights[0] == weights[-1] == 0 and inputs[0] == CLS and inputs[-1] == SEP
            np.testing.assert_array_equal(inputs[weights == 0], targets[weights == 0])
            ids.update(targets[1:-1].tolist())
            selected += int(weights.sum())
    assert ids == collections.Counter(int(t) for doc in docs for t in doc.split())  # every token once
    assert any(b["segment_ids"].max() > 1 for b in batches)  # several pieces share a row
    assert 0.05 * sum(ids.values()) < selected < 0.3 * sum(ids.values())
    # The eval masks are fixed: the same on every eval and every run, whatever the seed.
    again = pipeline.make_eval_batches(_mlm_config("train.eval_batches=1000", "seed=99"), MlmTokenizer(),
                                       toy_sources(["1"], docs))
    for a, b in zip(batches, again, strict=True):
        for k in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])


def test_a_document_gets_fresh_masks_each_epoch_and_the_same_masks_at_the_same_place():
    docs = [" ".join(str(100 + k) for k in range(40))]
    stream = grain.MapDataset.source(docs).repeat()
    cut = pipeline.cut_documents(_mlm_config(), MlmTokenizer(), stream, (7, 3, 0))
    first, second, first_again = cut[0], cut[1], cut[0]
    assert [p["targets"].tolist() for p in first] == [p["targets"].tolist() for p in second]
    assert any(not np.array_equal(a["weights"], b["weights"]) for a, b in zip(first, second))
    for a, b in zip(first, first_again):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


# ----------------------------------------------------------------------------- determinism of training batches


def _batches(config, rows=None, steps=4, state=None, tokenizer=None, docs=None):
    tokenizer = MlmTokenizer() if tokenizer is None else tokenizer
    it = shards.make_train_iterator(config, tokenizer, toy_sources(toy_docs(60) if docs is None else docs), rows)
    if state is not None:
        it.restore_from_saved([state])
    out = [next(it) for _ in range(steps)]
    saved = json.loads(json.dumps(shards.iterator_state(it)))  # as in a checkpoint
    it.close()
    return out, saved


def _assert_same(got, want):
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"step {step}, {k}")


def test_training_masks_survive_a_resume_and_do_not_depend_on_the_process_layout():
    config = _mlm_config("train.batch_size=8", "data.shuffle_window=8")
    uninterrupted, _ = _batches(config, steps=6)
    assert all(b["weights"].any() and (b["weights"] < (b["segment_ids"] > 0)).any() for b in uninterrupted)
    _, state = _batches(config, steps=3)
    resumed, _ = _batches(config, steps=3, state=state)
    _assert_same(resumed, uninterrupted[3:])
    # Two processes holding half the rows each assemble the same global batches.
    top, _ = _batches(config, rows=[(0, 4)], steps=6)
    bottom, _ = _batches(config, rows=[(4, 8)], steps=6)
    _assert_same([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(top, bottom)], uninterrupted)
    # Another seed masks (and orders) otherwise: the comparisons above can fail.
    other, _ = _batches(_mlm_config("train.batch_size=8", "data.shuffle_window=8", "seed=8"), steps=1)
    assert not np.array_equal(other[0]["weights"], uninterrupted[0]["weights"])


def test_clm_batches_are_unchanged_by_a_tokenizer_with_masked_lm_symbols():
    docs = toy_docs(30)
    config = toy_config("train.batch_size=8", "data.shuffle_window=8")
    runs = []
    for tokenizer in (ToyTokenizer(), MlmTokenizer()):
        it = shards.make_train_iterator(config, tokenizer, toy_sources(docs))
        runs.append([next(it) for _ in range(3)])
        it.close()
    for batch in runs[1]:  # next-token pairs of [bos] doc [eos], every real token weighing 1
        assert not set(check_batch(batch, 8)) - set(expected_pairs(docs))
    _assert_same(runs[1], runs[0])


# ----------------------------------------------------------------------------- span corruption (T5)

SENTINELS = tuple(range(900_000, 900_100))  # far from the ids of the pieces, so a test tells them apart
EOS = 3


def _rebuild(inputs, targets, sentinels=SENTINELS):
    """The piece again: each sentinel of the inputs replaced by what follows it in the targets."""
    assert inputs[-1] == targets[-1] == EOS
    spans, current = {}, None
    for t in targets[:-1].tolist():
        if t in sentinels:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    return [t for i in inputs[:-1].tolist() for t in (spans.pop(i) if i in sentinels else [i])], spans


def test_span_corruption_round_trips_with_t5_lengths_and_statistics():
    rng, data_rng = np.random.default_rng(0), np.random.default_rng(1)
    full, _ = objectives.span_lengths(512)
    tokens = noise = spans = 0
    for n in [*range(1, 60), *[full] * 180]:
        piece = data_rng.integers(10, 1000, size=n)
        inputs, targets = objectives.span_corrupt(piece, rng, sentinel_ids=SENTINELS, eos_id=EOS)
        assert inputs.dtype == targets.dtype == np.int32
        assert (len(inputs), len(targets)) == objectives.corrupted_lengths(n)
        rebuilt, unused = _rebuild(inputs, targets)
        assert rebuilt == piece.tolist() and not unused  # every span in its place, none left over
        used = [t for t in inputs.tolist() if t in SENTINELS]
        assert used == list(SENTINELS[:len(used)])  # sentinels in order, <extra_id_0> first
        assert (n < 2 or used) and inputs[0] not in SENTINELS  # starts with kept tokens
        if n == full:
            tokens += n
            noise += len(targets) - 1 - len(used)
            spans += len(used)
    assert tokens > 100_000
    assert abs(noise / tokens - 0.15) < 0.01 and abs(noise / spans - 3.0) < 0.2
    # T5's figures: inputs of 512 come from pieces of 568 ids and give targets of 114.
    assert (full, objectives.corrupted_lengths(full)) == (568, (512, 114))
    assert objectives.span_piece_length(512, 114) == 568 and objectives.span_piece_length(512, 60) < 568


def test_span_corruption_is_a_function_of_the_rng_and_needs_enough_sentinels():
    piece = np.arange(10, 110)
    a, b, c = (objectives.span_corrupt(piece, np.random.default_rng(s), sentinel_ids=SENTINELS, eos_id=EOS)
               for s in (5, 5, 6))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    with pytest.raises(ValueError, match="5 noise spans but there are only 2 sentinels"):
        objectives.span_corrupt(piece, np.random.default_rng(0), sentinel_ids=SENTINELS[:2], eos_id=EOS)


class SpanTokenizer(ToyTokenizer):
    """ToyTokenizer with sentinels (far from the documents' ids) as special ids."""

    sentinel_ids = SENTINELS
    special_ids = (0, 1, 2, 3, *SENTINELS)


SPAN_SEQ = 32


def _span_config(*extra):
    return toy_config("model.arch=t5", f"train.seq_len={SPAN_SEQ}", *extra)


def _long_docs(n, seed=0):
    """Document d holds ids 1000*d + 10 + k, some longer than a piece (full pieces), some empty."""
    lengths = np.random.default_rng(seed).integers(0, 130, size=n)
    return [" ".join(str(1000 * d + 10 + k) for k in range(lengths[d])) for d in range(n)]


def test_span_pieces_pack_both_sides_into_one_row_and_rebuild_their_documents():
    docs = _long_docs(40)
    config = _span_config("train.eval_batches=1000")
    piece, target_len = objectives.span_lengths(SPAN_SEQ)
    assert config.target_len == target_len and piece > SPAN_SEQ
    batches = pipeline.make_eval_batches(config, SpanTokenizer(), toy_sources(["1"], docs))
    rebuilt, full = collections.defaultdict(list), 0
    for batch in batches:
        for enc, _, targets, weights in encdec_examples(batch, BATCH, SPAN_SEQ, target_len):
            assert weights.all()
            ids, unused = _rebuild(enc, targets)
            assert not unused and ids == list(range(ids[0], ids[0] + len(ids)))  # a stretch of one document
            assert len(ids) <= piece and (len(ids) < piece or len(enc) == SPAN_SEQ)  # full pieces fill seq_len
            full += len(ids) == piece
            rebuilt[ids[0] // 1000].append(ids)
    assert full > 10 and any(b["segment_ids"].max() > 1 for b in batches)  # full pieces, and rows shared
    for d, doc in enumerate(docs):  # every id once, in pieces of `piece` ids (the last shorter); empty: none
        pieces = sorted(rebuilt.pop(d, []))
        assert [t for p in pieces for t in p] == [int(t) for t in doc.split()]
        assert all(len(p) == piece for p in pieces[:-1])
    assert not rebuilt
    # The eval corruption is fixed: the same on every eval and every run, whatever the seed.
    again = pipeline.make_eval_batches(_span_config("train.eval_batches=1000", "seed=99"), SpanTokenizer(),
                                       toy_sources(["1"], docs))
    _assert_same(again, batches)


def test_a_document_gets_fresh_spans_each_epoch_and_the_same_spans_at_the_same_place():
    stream = grain.MapDataset.source([" ".join(str(100 + k) for k in range(90))]).repeat()
    cut = pipeline.cut_documents(_span_config(), SpanTokenizer(), stream, (7, 3, 0))
    first, second, first_again = cut[0], cut[1], cut[0]
    assert len(first) == 3 and [_rebuild(p["encoder_inputs"], p["targets"])[0] for p in first] == [
        _rebuild(p["encoder_inputs"], p["targets"])[0] for p in second]
    assert any(not np.array_equal(a["targets"], b["targets"]) for a, b in zip(first, second))
    for a, b in zip(first, first_again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ConfigError, match="needs a tokenizer with the sentinels"):
        pipeline.cut_documents(_span_config(), ToyTokenizer(), stream, (7, 3, 0))


def test_span_batches_survive_a_resume_and_do_not_depend_on_the_process_layout():
    config = _span_config("train.batch_size=8", "data.shuffle_window=8", "data.virtual_shards=2")
    kw = {"tokenizer": SpanTokenizer(), "docs": _long_docs(60)}
    uninterrupted, _ = _batches(config, steps=4, **kw)
    for batch in uninterrupted:
        assert list(encdec_examples(batch, 8, SPAN_SEQ, config.target_len))
    _, state = _batches(config, steps=2, **kw)
    resumed, _ = _batches(config, steps=2, state=state, **kw)
    _assert_same(resumed, uninterrupted[2:])
    top, _ = _batches(config, rows=[(0, 4)], steps=4, **kw)
    bottom, _ = _batches(config, rows=[(4, 8)], steps=4, **kw)
    _assert_same([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(top, bottom)], uninterrupted)
    other, _ = _batches(_span_config("train.batch_size=8", "data.shuffle_window=8", "data.virtual_shards=2", "seed=8"),
                        steps=1, **kw)
    assert not np.array_equal(other[0]["targets"], uninterrupted[0]["targets"])


def test_span_targets_used_says_when_a_longer_target_len_is_padding():
    derived = objectives.span_lengths(32)[1]
    assert objectives.span_targets_used(32, derived) == derived  # the derived length is filled exactly
    assert objectives.span_targets_used(32, 200) == derived  # the inputs are full first: the rest is padding
    assert objectives.span_targets_used(32, derived - 1) <= derived - 1  # shorter pieces fill a shorter one
    assert objectives.span_targets_used(32, 3) == 3
