"""Tests of llm_jax.data.pipeline and llm_jax.data.tfds_builder: packing, eval batches, the training batches'
layout, TFDS sources (mocked) and the one-time preparation of local corpora. Virtual shards, process
layouts and workers: test_data_shards.py."""

import collections
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llm_jax.config import ConfigError, load_config
from llm_jax.data import corpus as corpus_lib
from llm_jax.data import pipeline, shards, tfds_builder
from llm_jax.models import build

SEQ, BATCH = 8, 4


class ToyTokenizer:
    """Documents are space-separated integers: the ids are visible in every test assertion."""

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3
    vocab_size = 1_000_000

    def encode(self, text):
        return [int(t) for t in text.split()]


class CharTokenizer(ToyTokenizer):
    def encode(self, text):
        return [4 + ord(c) % 250 for c in text]


def toy_docs(n, seed=0):
    """Document d holds ids 1000*d + 10 + k: each id names its document."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 4 * SEQ, size=n)
    return [" ".join(str(1000 * d + 10 + k) for k in range(lengths[d])) for d in range(n)]


def toy_config(*overrides):
    # A small piece window: each virtual shard fills its own before the first batch.
    return load_config(None, [f"train.seq_len={SEQ}", f"train.batch_size={BATCH}", "seed=7", "data.shuffle_window=64",
                              *overrides])


def toy_sources(train_docs, eval_docs=()):
    return pipeline.DataSources(train=list(train_docs), eval=list(eval_docs), description="toy")


def expected_pairs(docs, tok=ToyTokenizer()):
    pairs = collections.Counter()
    for doc in docs:
        tokens = [tok.bos_id, *tok.encode(doc), tok.eos_id]
        pairs.update(zip(tokens[:-1], tokens[1:]))
    return pairs


def check_batch(batch, rows):
    """Layout invariants of one batch; returns its (input, target) pairs with weight 1."""
    assert set(batch) == set(pipeline.BATCH_KEYS)
    for key in pipeline.BATCH_KEYS:
        assert batch[key].shape == (rows, SEQ), key
        assert batch[key].dtype == (np.float32 if key == "weights" else np.int32), key
    seg, pos = batch["segment_ids"], batch["positions"]
    np.testing.assert_array_equal(batch["weights"], (seg > 0).astype(np.float32))
    pad = seg == 0
    assert not batch["inputs"][pad].any() and not batch["targets"][pad].any() and not pos[pad].any()
    pairs = collections.Counter()
    for r in range(rows):
        ids = [s for s in seg[r] if s > 0]
        assert ids == sorted(ids) and (not ids or ids[0] == 1)  # pieces numbered 1, 2, ... in order
        assert (seg[r][:len(ids)] > 0).all()  # padding only at the end of a row
        for s in set(ids):
            where = seg[r] == s
            inputs, targets = batch["inputs"][r][where], batch["targets"][r][where]
            np.testing.assert_array_equal(pos[r][where], np.arange(where.sum()))
            np.testing.assert_array_equal(inputs[1:], targets[:-1])  # next tokens of one piece
            pairs.update(zip(inputs.tolist(), targets.tolist()))
    return pairs


def encdec_examples(batch, rows, seq_len, target_len):
    """Layout invariants of an encoder-decoder batch; yields each packed example's (encoder inputs,
    decoder inputs, targets, weights). Both sides of an example share its row and segment id."""
    assert set(batch) == set(pipeline.BATCH_KEYS) | set(pipeline.ENCODER_BATCH_KEYS)
    for key in batch:
        length = seq_len if key.startswith("encoder_") else target_len
        assert batch[key].shape == (rows, length), key
        assert batch[key].dtype == (np.float32 if key == "weights" else np.int32), key
    np.testing.assert_array_equal(batch["weights"], (batch["segment_ids"] > 0).astype(np.float32))
    for side in ("encoder_", ""):
        pad = batch[f"{side}segment_ids"] == 0
        assert not batch[f"{side}inputs"][pad].any() and not batch[f"{side}positions"][pad].any()
    for r in range(rows):
        enc_seg, dec_seg = batch["encoder_segment_ids"][r], batch["segment_ids"][r]
        ids = sorted(set(enc_seg[enc_seg > 0].tolist()))
        assert ids == sorted(set(dec_seg[dec_seg > 0].tolist())) == list(range(1, len(ids) + 1))
        for s in ids:
            enc, dec = enc_seg == s, dec_seg == s
            np.testing.assert_array_equal(batch["encoder_positions"][r][enc], np.arange(enc.sum()))
            np.testing.assert_array_equal(batch["positions"][r][dec], np.arange(dec.sum()))
            targets = batch["targets"][r][dec]
            np.testing.assert_array_equal(batch["inputs"][r][dec], [pipeline.DECODER_START_ID, *targets[:-1]])
            yield batch["encoder_inputs"][r][enc], batch["inputs"][r][dec], targets, batch["weights"][r][dec]


# ----------------------------------------------------------------------------- pieces and packing


def test_document_pieces_overlap_by_one_token():
    pieces = pipeline.document_pieces(list(range(10, 20)), seq_len=4, bos_id=2, eos_id=3)
    tokens = [2, *range(10, 20), 3]  # 12 tokens -> 11 targets -> pieces of 4, 4, 3
    assert [len(p["inputs"]) for p in pieces] == [4, 4, 3]
    assert [p["inputs"][0] for p in pieces] == [2, 13, 17]
    assert np.concatenate([p["targets"] for p in pieces]).tolist() == tokens[1:]
    assert np.concatenate([p["inputs"] for p in pieces]).tolist() == tokens[:-1]
    (empty,) = pipeline.document_pieces([], seq_len=4, bos_id=2, eos_id=3)
    assert empty["inputs"].tolist() == [2] and empty["targets"].tolist() == [3]


def test_packed_eval_batches_keep_every_target_inside_its_document():
    docs = toy_docs(25)
    config = toy_config("train.eval_batches=1000")
    batches = pipeline.make_eval_batches(config, ToyTokenizer(), toy_sources(["1"], docs))
    pairs = collections.Counter()
    for batch in batches:
        pairs += check_batch(batch, BATCH)
    # Every next-token pair of every document exactly once, and nothing that crosses documents.
    assert pairs == expected_pairs(docs)
    assert sum(b["weights"].sum() for b in batches) == sum(expected_pairs(docs).values())
    assert any(b["segment_ids"].max() > 1 for b in batches)  # several pieces share a row
    assert (batches[-1]["weights"] == 0).any()  # padding exists and has weight 0


def test_eval_batches_are_deterministic_limited_and_split_by_rows():
    docs = toy_docs(40)
    config = toy_config("train.eval_batches=3")
    sources = toy_sources(["1"], docs)
    first = pipeline.make_eval_batches(config, ToyTokenizer(), sources)
    again = pipeline.make_eval_batches(config, ToyTokenizer(), sources)
    assert len(first) == 3
    for a, b in zip(first, again):
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])
    # A process keeps the rows its devices hold, in order, and gets as many batches as the others.
    held = [pipeline.make_eval_batches(config, ToyTokenizer(), sources, rows) for rows in ([(0, 1), (3, 4)], [(1, 3)])]
    assert len(held[0]) == len(held[1]) == 3
    for whole, ends, middle in zip(first, *held):
        check_batch(ends, 2)
        np.testing.assert_array_equal(ends["inputs"], whole["inputs"][[0, 3]])
        np.testing.assert_array_equal(middle["inputs"], whole["inputs"][1:3])
    assert not pipeline.make_eval_batches(config, ToyTokenizer(), toy_sources(["1"], []))


def test_short_eval_split_is_padded_to_the_batch_shape():
    config = toy_config("train.eval_batches=5")
    (batch,) = pipeline.make_eval_batches(config, ToyTokenizer(), toy_sources(["1"], ["10 11 12"]))
    check_batch(batch, BATCH)
    assert batch["weights"].sum() == 4 and batch["weights"][1:].sum() == 0


# ----------------------------------------------------------------------------- training iterator


def test_train_batches_have_the_layout_and_real_pairs():
    docs = toy_docs(30)
    it = shards.make_train_iterator(toy_config(), ToyTokenizer(), toy_sources(docs))
    allowed = expected_pairs(docs)
    for _ in range(40):  # more than one epoch
        pairs = check_batch(next(it), BATCH)
        assert not set(pairs) - set(allowed), "a target crossed documents"


def test_restored_iterator_gives_exactly_the_next_batches():
    docs = toy_docs(30)
    config, sources = toy_config(), toy_sources(docs)
    it = shards.make_train_iterator(config, ToyTokenizer(), sources)
    for _ in range(37):  # past the end of the first epoch (about 25 batches)
        next(it)
    state = shards.iterator_state(it)
    state = json.loads(json.dumps(state))  # what a checkpoint stores
    expected = [next(it) for _ in range(12)]

    restored = shards.make_train_iterator(config, ToyTokenizer(), sources)
    fresh_first = next(restored)
    shards.restore_iterator_state(restored, state)
    got = [next(restored) for _ in range(12)]
    for want, have in zip(expected, got):
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(want[key], have[key])
    assert not np.array_equal(fresh_first["inputs"], expected[0]["inputs"])  # the test can fail


def test_same_seed_same_stream_other_seed_other_stream():
    docs = toy_docs(30)
    a = next(shards.make_train_iterator(toy_config(), ToyTokenizer(), toy_sources(docs)))
    b = next(shards.make_train_iterator(toy_config(), ToyTokenizer(), toy_sources(docs)))
    c = next(shards.make_train_iterator(toy_config("seed=8"), ToyTokenizer(), toy_sources(docs)))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])


def test_piece_window_mixes_long_documents_within_a_batch():
    """Long documents are cut into many pieces; without the window a batch is one document."""
    docs = [" ".join(str(1000 * d + 10 + k) for k in range(40 * SEQ)) for d in range(20)]

    def documents_per_batch(window):
        # One virtual shard: its rows come from consecutive documents unless the window mixes them.
        config = toy_config("train.batch_size=8", "data.virtual_shards=1", f"data.shuffle_window={window}")
        batch = next(shards.make_train_iterator(config, ToyTokenizer(), toy_sources(docs)))
        return len(set((batch["inputs"][batch["inputs"] >= 10] // 1000).tolist()))

    assert documents_per_batch(1) <= 2
    assert documents_per_batch(256) >= 5


# ----------------------------------------------------------------------------- sources


def test_text_source_decodes_bytes_and_str():
    source = pipeline.TextSource([{"text": b"caf\xc3\xa9"}, {"text": "plain"}, {"text": np.array(b"np")}], "text")
    assert len(source) == 3 and [source[i] for i in range(3)] == ["café", "plain", "np"]


def test_tfds_source_through_mock_data():
    config = toy_config("data.source=tfds", "data.tfds_name=lm1b", "data.tfds_eval_split=test",
                        "train.eval_batches=2")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        sources = pipeline.open_sources(config)
        assert len(sources.train) == 12 and len(sources.eval) == 12
        assert isinstance(sources.train[0], str) and sources.train[0]
        assert "lm1b" in sources.description
        batch = next(shards.make_train_iterator(config, CharTokenizer(), sources))
        check_batch(batch, BATCH)
        assert len(pipeline.make_eval_batches(config, CharTokenizer(), sources)) == 2
        with pytest.raises(ConfigError, match="data.text_key"):
            pipeline.open_sources(toy_config("data.source=tfds", "data.tfds_name=lm1b", "data.text_key=body"))


def test_unknown_tfds_dataset_is_a_config_error(tmp_path):
    config = toy_config("data.source=tfds", "data.tfds_name=no_such_dataset_here",
                        f"data.tfds_data_dir={tmp_path}")
    with pytest.raises(ConfigError, match="data.tfds_name") as err:
        pipeline.open_sources(config)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- local preparation


def _write_text_corpus(folder, n=12):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}\n" * (i + 1))
    (folder / "empty.txt").write_text("")
    return [f"document {i}\n" * (i + 1) for i in range(n)]


def _files(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_local_corpus_is_prepared_once_and_reused(tmp_path):
    texts = _write_text_corpus(tmp_path / "corpus")
    prep = tmp_path / "prep"
    config = toy_config("data.source=text", f"data.path={tmp_path / 'corpus' / '*.txt'}",
                        f"data.prepared_dir={prep}", "data.eval_fraction=0.3")
    first = pipeline.open_sources(config)
    assert first.description.endswith("12 documents from 13 files (1 skipped)")
    got = sorted([first.train[i] for i in range(len(first.train))] + [first.eval[i] for i in range(len(first.eval))])
    assert got == sorted(texts) and len(first.eval) > 0
    (folder,) = prep.iterdir()
    assert (folder / "llm_jax_local_corpus" / "1.0.0" / "dataset_info.json").is_file()
    files = _files(prep)
    assert any(".array_record" in p.name for p in files)

    second = pipeline.open_sources(config)
    assert _files(prep) == files  # nothing written again
    assert second.description == first.description
    assert [second.train[i] for i in range(len(second.train))] == [first.train[i] for i in range(len(first.train))]
    corpus = corpus_lib.find_corpus(config.data)
    prepared = tfds_builder.prepare_corpus(corpus, prep)
    assert prepared.reused and (prepared.documents, prepared.skipped) == (12, 1)

    (tmp_path / "corpus" / "new.txt").write_text("a new document\n")
    third = pipeline.open_sources(config)
    assert len(list(prep.iterdir())) == 2  # a changed corpus gets its own preparation
    assert len(third.train) + len(third.eval) == 13


def test_interrupted_preparation_does_not_look_complete(tmp_path, monkeypatch):
    _write_text_corpus(tmp_path / "corpus")
    config = toy_config("data.source=text", f"data.path={tmp_path / 'corpus' / '*.txt'}")
    corpus = corpus_lib.find_corpus(config.data)
    real = corpus_lib.iter_split

    def interrupted(*args, **kwargs):
        for i, doc in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt  # as if the user pressed ctrl-c mid-write
            yield doc

    monkeypatch.setattr(corpus_lib, "iter_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tfds_builder.prepare_corpus(corpus, tmp_path / "prep")
    data_dir = tfds_builder.prepared_data_dir(corpus, tmp_path / "prep")
    assert not tfds_builder._open(data_dir, None).is_prepared()
    assert not list(data_dir.rglob("dataset_info.json"))

    monkeypatch.setattr(corpus_lib, "iter_split", real)
    prepared = tfds_builder.prepare_corpus(corpus, tmp_path / "prep")
    assert not prepared.reused and prepared.documents == 12
    assert sum(prepared.split_sizes().values()) == 12


def test_corpus_without_documents_is_a_config_error(tmp_path):
    (tmp_path / "corpus").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "corpus" / name).write_text("   \n")
    config = toy_config("data.source=text", f"data.path={tmp_path / 'corpus' / '*.txt'}",
                        f"data.prepared_dir={tmp_path / 'prep'}")
    with pytest.raises(ConfigError, match="yields no documents") as err:
        pipeline.open_sources(config)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "prep").iterdir())  # nothing left that a rerun would reuse
    with pytest.raises(ConfigError, match="data.path"):
        pipeline.open_sources(toy_config("data.source=jsonl", f"data.path={tmp_path / 'none' / '*.jsonl'}"))


def test_default_corpus_opens_and_feeds_batches(tmp_path):
    config = toy_config(f"data.prepared_dir={tmp_path}")
    sources = pipeline.open_sources(config)
    n_docs = len(sources.train) + len(sources.eval)
    assert sources.description.startswith(f"default corpus: {n_docs} files (")
    assert len(sources.train) > 500 and len(sources.eval) > 0
    texts = [sources.eval[i] for i in range(len(sources.eval))]
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert any("import " in t or "def " in t for t in texts)  # Python source, decoded
    batch = next(shards.make_train_iterator(config, CharTokenizer(), sources))
    check_batch(batch, BATCH)


def test_tiny_corpora_prepare_with_the_splits_they_can_have(tmp_path):
    (tmp_path / "three").mkdir()
    for i in range(3):
        (tmp_path / "three" / f"d{i}.txt").write_text(f"{10 + i} {20 + i}\n")
    config = toy_config("data.source=text", f"data.path={tmp_path / 'three' / '*.txt'}",
                        f"data.prepared_dir={tmp_path / 'prep'}")
    sources = pipeline.open_sources(config)  # 2% of 3 files is none: one is held out anyway
    assert (len(sources.train), len(sources.eval)) == (2, 1)
    assert len(pipeline.make_eval_batches(config, ToyTokenizer(), sources)) == 1

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "only.txt").write_text("10 11 12\n")
    config = toy_config("data.source=text", f"data.path={tmp_path / 'one' / '*.txt'}",
                        f"data.prepared_dir={tmp_path / 'prep'}")
    sources = pipeline.open_sources(config)
    assert (len(sources.train), len(sources.eval)) == (1, 0)
    assert pipeline.make_eval_batches(config, ToyTokenizer(), sources) == []
    check_batch(next(shards.make_train_iterator(config, ToyTokenizer(), sources)), BATCH)


# ----------------------------------------------------------------------------- mixtures


def one_row_docs(source, n):
    """Documents of exactly one packed row each; ids 100000 * (source + 1) + 100 * doc + k."""
    return [" ".join(str(100_000 * (source + 1) + 100 * d + k) for k in range(SEQ - 1)) for d in range(n)]


def test_mixture_weights_hold_over_many_batches():
    weights = [5, 3, 2]
    parts = [toy_sources(one_row_docs(s, n), one_row_docs(s, 4)) for s, n in enumerate([300, 700, 110])]
    sources = pipeline.mix_sources(parts, weights)
    config = toy_config("data.shuffle_window=64")
    it = shards.make_train_iterator(config, ToyTokenizer(), sources)
    rows = collections.Counter()
    for _ in range(250):  # 1000 documents
        batch = next(it)
        assert batch["weights"].all()  # one document per row, no padding
        rows.update((batch["inputs"][:, 1] // 100_000 - 1).tolist())
    shares = [rows[s] / sum(rows.values()) for s in range(3)]
    assert shares == pytest.approx([w / sum(weights) for w in weights], abs=0.03)
    assert len(sources.eval) == 12 and {sources.eval[i].split()[0][0] for i in range(12)} == {"1", "2", "3"}


def test_mixture_resumes_exactly():
    # Sources of some hundred documents: grain's index shuffle is slow (ms) on a handful.
    parts = [toy_sources(toy_docs(200, seed=1)), toy_sources(one_row_docs(1, 300))]
    sources, config = pipeline.mix_sources(parts, [1, 3]), toy_config("data.shuffle_window=64")
    it = shards.make_train_iterator(config, ToyTokenizer(), sources)
    for _ in range(23):
        next(it)
    state = json.loads(json.dumps(shards.iterator_state(it)))
    expected = [next(it) for _ in range(8)]
    restored = shards.make_train_iterator(config, ToyTokenizer(), sources)
    shards.restore_iterator_state(restored, state)
    for want in expected:
        np.testing.assert_array_equal(want["inputs"], next(restored)["inputs"])


def test_mixture_of_local_corpora_through_the_config(tmp_path):
    _write_text_corpus(tmp_path / "text")  # 12 documents and an empty file
    lines = [json.dumps({"text": f"record {i}"}) for i in range(8)] + ["{broken"]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    config = toy_config("data.source=mixture", f"data.prepared_dir={tmp_path / 'prep'}", "data.eval_fraction=0.3",
                        f"data.mixture=[{{source: text, path: '{tmp_path}/text/*.txt', weight: 3}}, "
                        f"{{source: jsonl, path: '{tmp_path}/r.jsonl'}}]")
    sources = pipeline.open_sources(config)
    assert sources.description.startswith("mixture of 2 sources: 75% text corpus")
    assert (sources.documents, sources.skipped) == (20, {"empty": 1, "malformed json": 1})
    assert pipeline.skip_summary(sources) == "20 documents kept, 2 skipped: 1 empty, 1 malformed json"
    check_batch(next(shards.make_train_iterator(config, CharTokenizer(), sources)), BATCH)
    assert pipeline.make_eval_batches(config, CharTokenizer(), sources)
    bad = toy_config("data.source=mixture", f"data.mixture.0.path={tmp_path}/none/*.txt")
    with pytest.raises(ConfigError, match=r"^data.mixture.0: data.path=.* matches no files$"):
        pipeline.open_sources(bad)


# ----------------------------------------------------------------------------- preparation details


def test_prepared_splits_have_the_asked_number_of_shards(tmp_path):
    _write_text_corpus(tmp_path / "corpus", n=30)
    config = toy_config("data.source=text", f"data.path={tmp_path / 'corpus' / '*.txt'}", "data.eval_fraction=0.3")
    prepared = tfds_builder.prepare_corpus(corpus_lib.find_corpus(config.data), tmp_path / "prep", num_shards=3)
    assert prepared.split_shards() == {"train": 3, "validation": 3}
    assert len(list(prepared.data_dir.rglob("*train.array_record-*-of-00003"))) == 3
    assert prepared.bytes == sum(len(f"document {i}\n".encode()) * (i + 1) for i in range(30))
    assert prepared.skipped_reasons == {"empty": 1}
    # Every split gets the same count, so it is at most the documents of the smaller split.
    small_eval = corpus_lib.find_corpus(toy_config("data.source=text", f"data.path={config.data.path}").data)
    prepared = tfds_builder.prepare_corpus(small_eval, tmp_path / "prep", num_shards=3)
    assert prepared.split_sizes()["validation"] == 1 and prepared.split_shards()["train"] == 1


def test_tfds_dataset_missing_from_its_data_dir_is_one_line(tmp_path):
    config = toy_config("data.source=tfds", "data.tfds_name=lm1b", f"data.tfds_data_dir={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="not prepared in") as err:
        pipeline.open_sources(config)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "nowhere").exists() or not any((tmp_path / "nowhere").rglob("*.array_record*"))


# ----------------------------------------------------------------------------- seq2seq examples


def toy_pairs(n, seed=0):
    """Example d: input ids 1000*d + 10 + k, target the first half of them + 500000 each, so an
    example's target can be checked against its input; some are longer than a row (truncated)."""
    lengths = np.random.default_rng(seed).integers(1, 3 * SEQ, size=n)
    inputs = [[1000 * d + 10 + k for k in range(lengths[d])] for d in range(n)]
    return [(" ".join(map(str, ids)), " ".join(str(i + 500_000) for i in ids[:len(ids) // 2 + 1])) for ids in inputs]


def check_seq2seq_batch(batch, rows, seq_len=SEQ, target_len=SEQ):
    """Every example of a seq2seq batch: its target belongs to its input (no side crossed examples).
    Returns the first input id of each, which names the example."""
    firsts = []
    for enc, _, targets, _ in encdec_examples(batch, rows, seq_len, target_len):
        assert enc[-1] == targets[-1] == ToyTokenizer.eos_id  # eos kept last when cut
        np.testing.assert_array_equal(targets[:-1] - 500_000, enc[:len(targets) - 1])
        firsts.append(int(enc[0]))
    return firsts


def test_seq2seq_examples_are_cut_to_their_lengths_and_packed_side_by_side():
    assert pipeline.ENCODER_BATCH_KEYS == build.ENCODER_KEYS
    pairs = toy_pairs(40)
    config = toy_config("model.arch=t5", "train.objective=seq2seq", "train.eval_batches=1000")
    assert config.target_len == SEQ
    (piece,) = pipeline.PairCutter(ToyTokenizer(), 4, 3)(("10 11 12 13 14", "20 21"))
    assert {k: v.tolist() for k, v in piece.items()} == {
        "encoder_inputs": [10, 11, 12, 3], "inputs": [0, 20, 21], "targets": [20, 21, 3]}
    batches = pipeline.make_eval_batches(config, ToyTokenizer(), toy_sources(["1"], pairs))
    firsts = [f for batch in batches for f in check_seq2seq_batch(batch, BATCH)]
    assert sorted(firsts) == [1000 * d + 10 for d in range(40)]  # each example once
    assert any(b["segment_ids"].max() > 1 for b in batches)
    shorter = toy_config("model.arch=t5", "train.objective=seq2seq", "train.target_len=4")
    batch = next(shards.make_train_iterator(shorter, ToyTokenizer(), toy_sources(pairs)))
    check_seq2seq_batch(batch, BATCH, target_len=4)


def _write_pairs_jsonl(path, pairs):
    lines = [json.dumps({"question": q, "answer": a}) for q, a in pairs]
    lines += [json.dumps({"question": "10 11"}), json.dumps({"text": "12"})]  # no answer; no question
    path.write_text("\n".join(lines) + "\n")


def test_seq2seq_jsonl_trains_evaluates_and_resumes(tmp_path):
    pairs = toy_pairs(60, seed=1)
    _write_pairs_jsonl(tmp_path / "qa.jsonl", pairs)
    config = toy_config("model.arch=t5", "train.objective=seq2seq", "data.source=jsonl",
                        f"data.path={tmp_path}/*.jsonl", "data.input_key=question", "data.target_key=answer",
                        f"data.prepared_dir={tmp_path / 'prep'}",
                        "data.eval_fraction=0.2", "train.eval_batches=2", "data.shuffle_window=8")
    sources = pipeline.open_sources(config)
    assert sources.skipped == {"no string 'answer'": 1, "no string 'question'": 1}
    assert sources.description.endswith("60 examples from 1 files (2 skipped)")
    got = [split[i] for split in (sources.train, sources.eval) for i in range(len(split))]
    assert sorted(got) == sorted(pairs) and len(sources.eval) > 0
    eval_batches = pipeline.make_eval_batches(config, ToyTokenizer(), sources)
    assert len(eval_batches) >= 1 and all(check_seq2seq_batch(b, BATCH) for b in eval_batches)
    it = shards.make_train_iterator(config, ToyTokenizer(), sources)
    for _ in range(2):
        check_seq2seq_batch(next(it), BATCH)
    state = json.loads(json.dumps(shards.iterator_state(it)))
    want = next(it)
    it.close()
    resumed = shards.make_train_iterator(config, ToyTokenizer(), sources)
    first = next(resumed)
    shards.restore_iterator_state(resumed, state)
    got = next(resumed)
    resumed.close()
    assert set(got) == set(want) and not np.array_equal(first["encoder_inputs"], want["encoder_inputs"])
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_seq2seq_reads_examples_only():
    for source in ("text", "default", "mixture"):
        config = toy_config("model.arch=t5", "train.objective=seq2seq", f"data.source={source}", "data.path=x",
                            "data.mixture=[{source: jsonl, path: x}]" if source == "mixture" else "data.mixture=[]")
        with pytest.raises(ConfigError, match=rf"^data.source={source} holds text, but train.objective=seq2seq"):
            pipeline.open_sources(config)


def test_tfds_seq2seq_examples_through_mock_data():
    config = toy_config("model.arch=t5", "train.objective=seq2seq", "data.source=tfds", "data.tfds_name=aeslc",
                        "data.input_key=email_body", "data.target_key=subject_line", "train.eval_batches=2")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        sources = pipeline.open_sources(config)
        source, target = sources.train[0]
        assert isinstance(source, str) and isinstance(target, str) and source and target
        batch = next(shards.make_train_iterator(config, CharTokenizer(), sources))
        assert list(encdec_examples(batch, BATCH, SEQ, SEQ))
        assert len(pipeline.make_eval_batches(config, CharTokenizer(), sources)) == 2
        with pytest.raises(ConfigError, match="^data.target_key: dataset 'aeslc' has no feature 'summary'"):
            pipeline.open_sources(toy_config("model.arch=t5", "train.objective=seq2seq", "data.source=tfds",
                                             "data.tfds_name=aeslc", "data.input_key=email_body",
                                             "data.target_key=summary"))


def test_cut_pairs_counts_the_examples_seq2seq_cuts():
    # seq_len 8 and target_len 4 keep 7 input and 3 target ids (each side ends in eos).
    config = toy_config("model.arch=t5", "train.objective=seq2seq", "train.target_len=4")
    pairs = [("a" * 7, "b" * 3), ("a" * 8, "b" * 3), ("a", "b" * 4), ("a" * 9, "b" * 9)]
    assert pipeline.cut_pairs(config, CharTokenizer(), pairs) == (4, 2, 2)
    assert pipeline.cut_pairs(config, CharTokenizer(), pairs, limit=2) == (2, 1, 0)
    # What PairCutter does with them: the first example whole, the last cut on both sides.
    cutter = pipeline.PairCutter(CharTokenizer(), SEQ, 4)
    assert [len(cutter(p)[0]["encoder_inputs"]) for p in pairs] == [8, 8, 2, 8]


@pytest.mark.parametrize("overrides, most", [(["model.max_documents_per_row=2"], 2),
                                             (["model.attention=cudnn", "model.dtype=bfloat16"], 16)])
def test_rows_hold_at_most_max_documents_per_row(overrides, most):
    # Short documents (1 or 2 tokens + bos/eos) so that many would fit in a row of seq_len 64.
    docs = [" ".join(str(1000 * d + k) for k in range(d % 2 + 1)) for d in range(400)]
    config = toy_config("train.seq_len=64", "model.max_len=64", *overrides)
    assert config.model.resolved_max_documents_per_row == most
    eval_batches = pipeline.make_eval_batches(config, ToyTokenizer(), toy_sources(["1"], docs))
    it = shards.make_train_iterator(config, ToyTokenizer(), toy_sources(docs))
    batches = [next(it) for _ in range(3)] + eval_batches
    counts = [len(set(row.tolist()) - {0}) for batch in batches for row in batch["segment_ids"]]
    assert max(counts) == most  # the bound is reached, never passed
