"""Tests of llm_jax.data.shards: the global batch of a step depends on the seed and the step alone,
not on which rows a process holds, how many processes there are, or data.workers; and a saved
position resumes exactly on any layout."""

import collections
import json
import logging

import numpy as np
import pytest
from test_data import SEQ, ToyTokenizer, check_batch, expected_pairs, toy_config, toy_docs, toy_sources

from llm_jax.config import ConfigError
from llm_jax.data import pipeline, shards

STEPS = 6

# Fake process layouts of a batch of 8 rows: the rows each process's devices hold.
LAYOUTS = {
    "1 process": [[(0, 8)]],
    "2 processes": [[(0, 4)], [(4, 8)]],
    "4 processes": [[(0, 2)], [(2, 4)], [(4, 6)], [(6, 8)]],
    # One process per device, tensor=2 across processes: pairs of processes hold the same rows.
    "2x tensor": [[(0, 4)], [(0, 4)], [(4, 8)], [(4, 8)]],
    # Devices laid out across processes: ranges that are not contiguous, shards held in part.
    "interleaved": [[(0, 1), (3, 6)], [(1, 3), (6, 8)]],
}


def _config(*extra):
    return toy_config("train.batch_size=8", "data.shuffle_window=8", *extra)


def _global_batches(config, sources, layout, steps=STEPS, states=None):
    """The global batches that the processes of `layout` assemble, each loading only its rows."""
    iterators = [shards.make_train_iterator(config, ToyTokenizer(), sources, rows) for rows in layout]
    if states is not None:
        for it in iterators:
            it.restore_from_saved(states)
    out = []
    for _ in range(steps):
        batch = {k: np.full((8, SEQ), -1, np.float32 if k == "weights" else np.int32) for k in pipeline.BATCH_KEYS}
        for rows, it in zip(layout, iterators):
            local = next(it)
            at = 0
            for start, stop in rows:
                for k in pipeline.BATCH_KEYS:
                    if (batch[k][start:stop] != -1).all():  # held by another process too: the same rows
                        np.testing.assert_array_equal(batch[k][start:stop], local[k][at:at + stop - start])
                    batch[k][start:stop] = local[k][at:at + stop - start]
                at += stop - start
        out.append(batch)
    for it in iterators:
        it.close()
    return out


def _assert_same(got, want):
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        for k in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"step {step}, {k}")


def test_rows_of_a_global_batch_do_not_depend_on_the_process_layout():
    docs = toy_docs(60)
    config, sources = _config(), toy_sources(docs)
    single = _global_batches(config, sources, LAYOUTS["1 process"])
    allowed = expected_pairs(docs)
    for batch in single:
        assert not set(check_batch(batch, 8)) - set(allowed)
    for layout in LAYOUTS.values():
        _assert_same(_global_batches(config, sources, layout), single)
    # The comparison can fail: another seed gives other batches.
    assert not np.array_equal(_global_batches(_config("seed=8"), sources, LAYOUTS["1 process"], 1)[0]["inputs"],
                              single[0]["inputs"])


def test_a_process_runs_only_the_shards_of_its_rows():
    config, sources = _config("data.virtual_shards=4"), toy_sources(toy_docs(20))
    it = shards.make_train_iterator(config, ToyTokenizer(), sources, [(1, 2), (6, 8)])
    assert (it.virtual_shards, it.rows_per_shard, it.shards) == (4, 2, [0, 3])
    check_batch(next(it), 3)
    assert sorted(it.get_state()["shards"]) == ["0", "3"]
    it.close()
    assert shards.num_virtual_shards(toy_config("train.batch_size=12")) == 4  # gcd with 8
    with pytest.raises(ConfigError, match="data.virtual_shards"):
        toy_config("data.virtual_shards=3")
    with pytest.raises(ValueError, match="sorted, disjoint"):
        shards.make_train_iterator(config, ToyTokenizer(), sources, [(4, 8), (0, 2)])


def test_shards_deal_the_document_stream_disjointly_and_completely():
    n = 24
    docs = [f"{i}" for i in range(n)]
    config = toy_config()
    for sources in (toy_sources(docs), pipeline.mix_sources([toy_sources(docs[:16]), toy_sources(docs[16:])], [2, 1])):
        stream = pipeline.global_documents(config, sources)
        for count in (1, 2, 4):
            dealt = collections.Counter(stream[v::count][i] for v in range(count) for i in range(3 * n // count))
            assert dealt == collections.Counter(stream[i] for i in range(3 * n))
    stream = pipeline.global_documents(config, toy_sources(docs))
    epoch0, epoch1 = [stream[i] for i in range(n)], [stream[i] for i in range(n, 2 * n)]
    assert sorted(epoch0, key=int) == docs and sorted(epoch1, key=int) == docs
    assert epoch0 != docs and epoch1 != epoch0  # shuffled, and reshuffled each epoch
    in_order = pipeline.global_documents(toy_config("data.shuffle=false"), toy_sources(docs))
    assert [in_order[i] for i in range(n)] == docs


@pytest.mark.parametrize("old, new", [("2 processes", "1 process"), ("1 process", "4 processes"),
                                      ("interleaved", "2x tensor")])
def test_a_resume_on_another_layout_continues_exactly(old, new):
    docs = toy_docs(60)
    config, sources = _config(), toy_sources(docs)
    uninterrupted = _global_batches(config, sources, LAYOUTS["1 process"], steps=2 * STEPS)
    iterators = [shards.make_train_iterator(config, ToyTokenizer(), sources, rows) for rows in LAYOUTS[old]]
    for it in iterators:
        for _ in range(STEPS):
            next(it)
    saved = [json.loads(json.dumps(shards.iterator_state(it))) for it in iterators]  # as in a checkpoint
    for it in iterators:
        it.close()
    _assert_same(_global_batches(config, sources, LAYOUTS[new], states=saved), uninterrupted[STEPS:])


def test_workers_do_not_change_the_batches_and_their_states_are_interchangeable():
    docs = toy_docs(60)
    sources = toy_sources(docs)
    in_process = _global_batches(_config(), sources, LAYOUTS["1 process"], steps=2 * STEPS)
    it = shards.make_train_iterator(_config("data.workers=2"), ToyTokenizer(), sources)
    with_workers = [next(it) for _ in range(STEPS)]
    assert type(with_workers[0]["inputs"]) is np.ndarray
    state = json.loads(json.dumps(shards.iterator_state(it)))
    it.close()
    _assert_same(with_workers, in_process[:STEPS])
    # Saved with workers, resumed without (in two processes): the same next batches.
    _assert_same(_global_batches(_config(), sources, LAYOUTS["2 processes"], states=[state]), in_process[STEPS:])


def test_saved_states_that_cannot_resume_this_run(caplog):
    config, sources = _config(), toy_sources(toy_docs(20))
    it = shards.make_train_iterator(config, ToyTokenizer(), sources, [(0, 4)])
    state = shards.iterator_state(it)
    whole = shards.make_train_iterator(config, ToyTokenizer(), sources)
    with pytest.raises(FileNotFoundError, match=r"lack virtual shards \[4, 5, 6, 7\]") as err:
        whole.restore_from_saved([state])  # the other process's file is missing: a damaged checkpoint
    assert "\n" not in str(err.value)
    fewer = shards.make_train_iterator(_config("data.virtual_shards=2"), ToyTokenizer(), sources)
    with pytest.raises(ConfigError, match="data.virtual_shards=8"):
        fewer.restore_from_saved([state])
    # A state from before virtual shards: the data restarts from the beginning, said in the log.
    fresh = next(shards.make_train_iterator(config, ToyTokenizer(), sources))
    with caplog.at_level(logging.WARNING):
        whole.restore_from_saved([{"parent": {"next_index": 3}}])
    assert "older version" in caplog.text
    np.testing.assert_array_equal(next(whole)["inputs"], fresh["inputs"])
    for i in (it, whole, fewer):
        i.close()
