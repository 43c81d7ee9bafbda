"""Tests of llm_jax.data.labelled (reading, splitting and labelling fine-tuning examples) and
llm_jax.data.task_inputs (their tokens: classification inputs, word labels on pieces)."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llm_jax.config import ConfigError, load_config
from llm_jax.config.checks import MLM_SYMBOLS
from llm_jax.data import corpus as corpus_lib
from llm_jax.data import labelled
from llm_jax.data import task_inputs as ti
from llm_jax.data import tokenizer as tok_lib


def _classify(*overrides):
    return load_config(None, ["task.kind=classify", "data.source=jsonl", "data.path=unused", *overrides])


def _tag(*overrides):
    return load_config(None, ["task.kind=tag", "data.source=conll", "data.path=unused", *overrides])


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- classification files


def test_csv_reader_takes_the_named_columns_and_counts_bad_rows(tmp_path):
    _write(tmp_path / "train.csv", 'id,sentence,label\n1,"good, very good",pos\n2,bad,neg\n3,no label,\n'
                                   '4,too,many,fields\n5,,pos\n6,"multi\nline",neg\n')
    _write(tmp_path / "dev.csv", "id,sentence,label\n1,fine,pos\n2,odd,neutral\n")
    sources = labelled.open_labelled(_classify("data.source=csv", f"data.path={tmp_path / 'train.csv'}",
                                               f"data.eval_path={tmp_path / 'dev.csv'}", "data.text_key=sentence"))
    assert [(e.text, e.label) for e in sources.train] == [("good, very good", "pos"), ("bad", "neg"),
                                                           ("multi\nline", "neg")]
    assert [e.key for e in sources.train] == ["train.csv:2", "train.csv:3", "train.csv:8"]
    assert [(e.text, e.label) for e in sources.eval] == [("fine", "pos")]
    assert sources.labels == labelled.LabelSet("classify", ("neg", "pos"))
    assert sources.skipped == {"no label": 1, "wrong number of fields": 1, "empty text": 1,
                               "label unseen in training": 1}
    assert "3 train, 1 eval" in sources.description


def test_tsv_is_tab_separated_without_quoting_and_reads_pairs(tmp_path):
    # GLUE's TSVs hold bare quotes inside sentences: they must stay text.
    _write(tmp_path / "pairs.tsv", 'a\tb\tlabel\nhe said "hi\tshe left\t1\nx\ty\t0\n"q"\tr\t1\n')
    config = _classify("data.source=csv", f"data.path={tmp_path / 'pairs.tsv'}", "data.text_key=a",
                       "data.text_pair_key=b", f"data.eval_path={tmp_path / 'pairs.tsv'}")
    sources = labelled.open_labelled(config)
    assert [(e.text, e.pair, e.label) for e in sources.train] == [('he said "hi', "she left", "1"), ("x", "y", "0"),
                                                                   ('"q"', "r", "1")]
    assert labelled.TextView(sources.train)[0] == 'he said "hi\nshe left'


def test_a_missing_column_is_a_one_line_config_error(tmp_path):
    _write(tmp_path / "t.csv", "text;category\nabc;x\n")
    with pytest.raises(ConfigError, match=r"^data.label_key: t.csv has no column 'label' .*it has: text, category"):
        labelled.open_labelled(_classify("data.source=csv", f"data.path={tmp_path / 't.csv'}"))


def test_jsonl_labels_may_be_integers_sorted_by_value_and_bad_records_are_counted(tmp_path):
    rows = [{"text": f"example {i}", "label": i % 11} for i in range(40)]
    rows += [{"text": "no label"}, {"text": 3, "label": 1}, {"text": "float", "label": 0.5}, [1, 2]]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    _write(tmp_path / "a.jsonl", "\n".join(lines) + "\n")
    sources = labelled.open_labelled(_classify(f"data.path={tmp_path / 'a.jsonl'}",
                                               f"data.eval_path={tmp_path / 'a.jsonl'}"))
    assert sources.labels.names == tuple(str(i) for i in range(11))  # "10" after "9"
    assert len(sources.train) == 40 and sources.train[12].label == "1"
    assert sources.skipped == {"no label": 4, "no string 'text'": 2, "malformed json": 4}  # both splits


def test_hash_split_holds_out_by_key_and_is_stable(tmp_path):
    _write(tmp_path / "d" / "a.jsonl", "".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n"
                                               for i in range(200)))
    config = _classify(f"data.path={tmp_path / 'd' / '*.jsonl'}", "data.eval_fraction=0.25")
    sources = labelled.open_labelled(config)
    held = {e.key for e in sources.eval}
    assert held == {f"a.jsonl:{i + 1}" for i in range(200) if corpus_lib.is_eval_key(f"a.jsonl:{i + 1}", 0.25)}
    assert 20 < len(held) < 80 and len(sources.train) + len(held) == 200
    assert {e.key for e in labelled.open_labelled(config).eval} == held


def test_a_tiny_set_still_gets_both_splits():
    examples = [labelled.ClassifyExample(f"f:{i}", "t", None, "x") for i in range(3)]
    train, held = labelled.split_by_key(examples, 0.01)
    assert len(train) == 2 and len(held) == 1


def test_nothing_usable_is_a_one_line_config_error(tmp_path):
    _write(tmp_path / "bad.jsonl", '{"text": "x"}\n{"label": 1}\n')
    with pytest.raises(ConfigError, match=r"^no usable classify examples in jsonl .*2 skipped: 1 no label") as info:
        labelled.open_labelled(_classify(f"data.path={tmp_path / 'bad.jsonl'}"))
    assert "\n" not in str(info.value)
    _write(tmp_path / "good.jsonl", '{"text": "x", "label": "a"}\n')
    _write(tmp_path / "other.jsonl", '{"text": "y", "label": "b"}\n')
    with pytest.raises(ConfigError, match=r"^no usable held-out classify examples .*1 label unseen in training"):
        labelled.open_labelled(_classify(f"data.path={tmp_path / 'good.jsonl'}",
                                         f"data.eval_path={tmp_path / 'other.jsonl'}"))


# ----------------------------------------------------------------------------- tagging files


CONLL_2003 = """-DOCSTART- -X- -X- O

EU NNP B-NP I-ORG
rejects VBZ B-VP O
German JJ B-NP I-MISC
call NN I-NP O

Peter NNP B-NP I-PER
Blackburn NNP I-NP I-PER

broken-line-without-tag
and O

Rome NNP B-NP I-LOC
"""


def test_conll_reader_takes_first_and_last_columns_and_rewrites_iob1_as_iob2(tmp_path):
    _write(tmp_path / "train.txt", CONLL_2003)
    _write(tmp_path / "dev.txt", "Paris B-LOC\nis O\n\nBerlin B-LOC\nvs O\nAcme B-ORG\n\nX E-LOC\n")
    sources = labelled.open_labelled(_tag(f"data.path={tmp_path / 'train.txt'}",
                                          f"data.eval_path={tmp_path / 'dev.txt'}"))
    assert [(e.key, e.words, e.tags) for e in sources.train] == [
        ("train.txt:1", ("EU", "rejects", "German", "call"), ("B-ORG", "O", "B-MISC", "O")),
        ("train.txt:2", ("Peter", "Blackburn"), ("B-PER", "I-PER")),
        ("train.txt:4", ("Rome",), ("B-LOC",)),
    ]
    # Both B- and I- of every type seen in training, even where training has only one of them.
    assert sources.labels.names == ("B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER", "O")
    assert [e.words for e in sources.eval] == [("Paris", "is"), ("Berlin", "vs", "Acme")]
    assert sources.skipped == {"line without a tag": 1, "tag not IOB": 1}


def test_jsonl_tags_of_another_length_than_their_tokens_are_skipped(tmp_path):
    rows = [{"tokens": ["a", "b"], "tags": ["B-X", "I-X"]}, {"tokens": ["a", "b"], "tags": ["O"]},
            {"tokens": "a b", "tags": ["O"]}, {"tokens": ["a", ""], "tags": ["O", "O"]}, {"tokens": [], "tags": []}]
    _write(tmp_path / "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    sources = labelled.open_labelled(_tag("data.source=jsonl", f"data.path={tmp_path / 't.jsonl'}",
                                          f"data.eval_path={tmp_path / 't.jsonl'}"))
    assert [e.tags for e in sources.train] == [("B-X", "I-X")]
    assert sources.skipped == {"tags and tokens differ in length": 2, "no list of strings 'tokens'": 2,
                               "empty word": 2, "empty sentence": 2}


def test_iob2_rewrite():
    assert labelled.to_iob2(["I-A", "I-A", "I-B", "O", "I-B", "B-B", "I-B"]) == (
        "B-A", "I-A", "B-B", "O", "B-B", "B-B", "I-B")
    assert labelled.to_iob2(["O", "S-A"]) is None and labelled.to_iob2(["B-"]) is None


# ----------------------------------------------------------------------------- label sets


def test_label_set_is_saved_and_reloaded(tmp_path):
    labels = labelled.LabelSet("tag", ("B-X", "I-X", "O"))
    labelled.save_labels(labels, tmp_path / labelled.LABELS_FILE)
    assert json.loads((tmp_path / "labels.json").read_text()) == {"task": "tag", "labels": ["B-X", "I-X", "O"]}
    again = labelled.load_labels(tmp_path / "labels.json")
    assert again == labels and again.id("O") == 2 and "I-X" in again and "I-Y" not in again
    # A run's saved set wins over the training split's: ids keep their meaning on resume.
    (tmp_path / "t.conll").write_text("a B-X\nb I-X\n\nc B-Y\n\nd O\n")
    config = load_config(None, ["task.kind=tag", "data.source=conll", f"data.path={tmp_path / 't.conll'}",
                                f"data.eval_path={tmp_path / 't.conll'}"])
    sources = labelled.open_labelled(config, labels=again)
    assert sources.labels is again and [e.words for e in sources.train] == [("a", "b"), ("d",)]
    assert sources.skipped == {"label not in the run's label set": 1, "label unseen in training": 1}
    with pytest.raises(ConfigError, match="label set is for task classify"):
        labelled.open_labelled(config, labels=labelled.LabelSet("classify", ("a",)))
    (tmp_path / "labels.json").write_text('{"task": "tag"')
    with pytest.raises(ConfigError, match="cannot be read"):
        labelled.load_labels(tmp_path / "labels.json")
    with pytest.raises(ConfigError, match="cannot be read"):
        labelled.load_labels(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- TFDS (mocked, offline)


def test_tfds_glue_sst2_keeps_the_class_label_names():
    config = _classify("data.source=tfds", "data.tfds_name=glue/sst2", "data.text_key=sentence")
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        sources = labelled.open_labelled(config)
        with pytest.raises(ConfigError, match="^data.text_pair_key: dataset 'glue/sst2' has no feature 'question'"):
            labelled.open_labelled(_classify("data.source=tfds", "data.tfds_name=glue/sst2", "data.text_key=sentence",
                                             "data.text_pair_key=question"))
    assert len(sources.train) == 20 and len(sources.eval) > 0
    assert set(sources.labels.names) <= {"negative", "positive"}
    assert {e.label for e in sources.train} == set(sources.labels.names)
    assert isinstance(sources.train[0].text, str) and sources.train[0].key == "train:0"


def test_tfds_conll2003_tags_by_name_and_skips_mismatched_lengths():
    from tensorflow_datasets.text import conll2003  # noqa: F401  (registers the dataset)

    names = tfds.builder("conll2003").info.features["ner"].feature.names  # O, B-PER, I-PER, ...
    records = [{"tokens": np.asarray(["EU", "rejects", "Peter", "Blackburn"]), "ner": np.asarray([3, 0, 1, 2])},
               {"tokens": np.asarray(["a", "b"]), "ner": np.asarray([0])}]

    def as_data_source(self, split, **kwargs):
        return records

    config = _tag("data.source=tfds", "data.tfds_name=conll2003", "data.tags_key=ner")
    with tfds.testing.mock_data(as_data_source_fn=as_data_source, policy=tfds.testing.MockPolicy.USE_CODE):
        sources = labelled.open_labelled(config)
    assert [(e.words, e.tags) for e in sources.train] == [
        (("EU", "rejects", "Peter", "Blackburn"), (names[3], "O", names[1], names[2]))]
    assert sources.skipped == {"tags and tokens differ in length": 2}  # one per split
    assert "B-PER" in sources.labels and "I-ORG" in sources.labels


# ----------------------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    """A small SentencePiece model as the project trains them (no dummy prefix), with [CLS] [SEP] [MASK]."""
    words = ["fine", "tuning", "token", "labels", "words", "pieces", "first", "sentence", "model", "tagging"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 12)) + "\n" for _ in range(300)]
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    tok_lib.train_tokenizer(texts, prefix, vocab_size=300, user_defined_symbols=MLM_SYMBOLS)
    return tok_lib.Tokenizer(prefix.with_suffix(".model"))


def test_first_piece_of_each_word_carries_its_label(spm_tokenizer):
    words = ["Extraordinarily", "fine", "zygomorphic", "tokens"]  # rare words split into several pieces
    aligned = ti.align_word_labels(spm_tokenizer, words, [3, 0, 5, 1], max_len=64)
    assert aligned.ids.tolist() == spm_tokenizer.encode(" ".join(words))  # the pieces of the running text
    assert spm_tokenizer.decode(aligned.ids) == " ".join(words)
    per_word = [np.flatnonzero(aligned.word_index == w) for w in range(4)]
    assert len(per_word[0]) > 1 and len(per_word[2]) > 1
    for w, label in enumerate([3, 0, 5, 1]):
        first, rest = per_word[w][0], per_word[w][1:]
        assert aligned.labels[first] == label and (aligned.labels[rest] == ti.IGNORE).all()
        assert spm_tokenizer.decode(aligned.ids[per_word[w]]).strip() == words[w]
    assert aligned.words_kept == 4 and not aligned.truncated


def test_alignment_cut_at_max_len_counts_the_words_kept(spm_tokenizer):
    words = ["zygomorphic", "fine", "extraordinarily"]
    full = ti.align_word_labels(spm_tokenizer, words, [1, 2, 3], max_len=64)
    cut = ti.align_word_labels(spm_tokenizer, words, [1, 2, 3], max_len=int(np.flatnonzero(full.word_index == 2)[0]))
    assert cut.truncated and cut.words_kept == 2 and cut.labels.tolist() == full.labels[:len(cut.labels)].tolist()


def test_tag_encoder_puts_specials_around_the_pieces(spm_tokenizer):
    labels = labelled.LabelSet("tag", ("B-X", "I-X", "O"))
    example = labelled.TagExample("k", ("fine", "zygomorphic"), ("O", "B-X"))
    enc = ti.TagEncoder(spm_tokenizer, labels, seq_len=32, encoder=True)(example)
    assert enc["inputs"][0] == spm_tokenizer.cls_id and enc["inputs"][-1] == spm_tokenizer.sep_id
    assert enc["labels"][[0, -1]].tolist() == [-1, -1] and enc["word_index"][[0, -1]].tolist() == [-1, -1]
    second = int(np.flatnonzero(enc["word_index"] == 1)[0])
    assert enc["labels"][1] == 2 and enc["labels"][second] == 0
    dec = ti.TagEncoder(spm_tokenizer, labels, seq_len=32, encoder=False)(example)
    assert dec["inputs"][0] == spm_tokenizer.bos_id and dec["labels"].tolist() == [-1, *enc["labels"][1:-1]]
    fits = len(enc["inputs"])
    assert ti.count_truncated(ti.TagEncoder(spm_tokenizer, labels, fits, encoder=True), [example] * 2) == 0
    short = ti.TagEncoder(spm_tokenizer, labels, fits - 1, encoder=True)
    assert ti.count_truncated(short, [example] * 2) == 2 and len(short(example)["inputs"]) == fits - 1


def test_classification_inputs_per_model_kind_cut_the_longer_text_first(spm_tokenizer):
    tok = spm_tokenizer
    a, b = "fine tuning " * 20, "model"
    ids, types = ti.encoder_classify_inputs(tok, a, b, seq_len=16)
    b_ids = tok.encode(b)
    assert len(ids) == 16 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert ids[-1 - len(b_ids):-1].tolist() == b_ids and ids[-2 - len(b_ids)] == tok.sep_id  # the pair kept whole
    assert types.tolist() == [0] * (16 - len(b_ids) - 1) + [1] * (len(b_ids) + 1)
    ids, _ = ti.decoder_classify_inputs(tok, "model", None, seq_len=16)
    assert ids.tolist() == [tok.bos_id, *tok.encode("model"), tok.eos_id]
    labels = labelled.LabelSet("classify", ("neg", "pos"))
    encoder = ti.ClassifyEncoder(tok, labels, 16, encoder=False)
    enc = encoder(labelled.ClassifyExample("k", a, None, "pos"))
    assert int(enc["label"]) == 1 and len(enc["inputs"]) == 16 and enc["inputs"][-1] == tok.eos_id
    pair = labelled.ClassifyExample("k", "model", "fine", "neg")
    exact = ti.ClassifyEncoder(tok, labels, len(encoder(pair)["inputs"]), encoder=False)
    assert ti.count_truncated(exact, [pair]) == 0
    assert ti.count_truncated(encoder, [labelled.ClassifyExample("k", a, None, "pos"), pair]) == 1
    assert ti.count_truncated(ti.ClassifyEncoder(tok, labels, exact.seq_len - 1, encoder=False), [pair]) == 1
