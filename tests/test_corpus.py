"""Tests of llm_jax.data.corpus: listing, reading, skipping and splitting local documents."""

import dataclasses
import json
import os
import sysconfig
from pathlib import Path

import pytest

from llm_jax.config import ConfigError, DataConfig
from llm_jax.data import corpus as corpus_lib


def _texts(corpus):
    stats = corpus_lib.CorpusStats()
    docs = list(corpus_lib.iter_documents(corpus, stats))
    return {d.key: d.text for d in docs}, stats


# ----------------------------------------------------------------------------- default corpus


def test_default_corpus_is_sorted_stdlib_without_site_packages():
    corpus = corpus_lib.find_corpus(DataConfig(source="default"))
    root = Path(sysconfig.get_path("stdlib")).resolve()
    assert corpus.kind == "default" and corpus.root == root
    keys = [corpus.relative(p) for p in corpus.files]
    assert keys == sorted(keys)
    assert len(keys) > 500  # the stdlib has well over a thousand modules
    assert all(k.endswith(".py") for k in keys)
    for part in ("site-packages", "dist-packages", "__pycache__"):
        assert not any(part in k.split("/") for k in keys), part
    assert "os.py" in keys and "json/__init__.py" in keys


def test_default_listing_prunes_excluded_folders(tmp_path):
    for rel in ["b.py", "a/x.py", "site-packages/pkg/m.py", "dist-packages/n.py",
                "a/__pycache__/x.cpython-311.py", "notes.txt"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n")
    keys = [p.relative_to(tmp_path).as_posix() for p in corpus_lib.list_default_files(tmp_path)]
    assert keys == ["a/x.py", "b.py"]


def test_split_is_a_stable_hash_of_the_key():
    # Pinned values: a change of the hash would silently move documents between splits.
    assert corpus_lib.is_eval_key("os.py", 0.97) and not corpus_lib.is_eval_key("os.py", 0.96)
    assert corpus_lib.is_eval_key("a.txt", 0.82) and not corpus_lib.is_eval_key("a.txt", 0.81)
    keys = [f"file{i}.py" for i in range(20000)]
    share = sum(corpus_lib.is_eval_key(k, 0.1) for k in keys) / len(keys)
    assert 0.09 < share < 0.11


def test_split_does_not_depend_on_other_files(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}\n")
    full = corpus_lib.find_corpus(DataConfig(source="text", path=str(tmp_path / "*.txt"), eval_fraction=0.3))
    plan = corpus_lib.plan_splits(full)
    evals = {d.key for d in corpus_lib.iter_split(full, "validation", plan)}
    trains = {d.key for d in corpus_lib.iter_split(full, "train", plan)}
    assert evals and trains and not evals & trains and len(evals | trains) == 40
    assert (plan.train, plan.validation) == (len(trains), len(evals)) and plan.to_eval is None
    assert evals == {k for k in evals | trains if corpus_lib.is_eval_key(k, 0.3)}
    for i in range(0, 40, 2):  # drop half of the files: the rest keep their split
        (tmp_path / f"doc{i:02d}.txt").unlink()
    half = corpus_lib.find_corpus(DataConfig(source="text", path=str(tmp_path / "*.txt"), eval_fraction=0.3))
    half_evals = {d.key for d in corpus_lib.iter_split(half, "validation", corpus_lib.plan_splits(half))}
    assert half_evals == {k for k in evals if int(k[3:5]) % 2}


@pytest.mark.parametrize("n_docs, fraction, want", [(5, 0.001, (4, 1)), (1, 0.001, (1, 0)),
                                                    (3, 0.999, (1, 2)), (1, 0.999, (1, 0))])
def test_small_corpus_keeps_both_splits_when_it_can(tmp_path, n_docs, fraction, want):
    for i in range(n_docs):
        (tmp_path / f"d{i}.txt").write_text(f"document {i}\n")
    corpus = corpus_lib.find_corpus(DataConfig(source="text", path=str(tmp_path / "*.txt"), eval_fraction=fraction))
    plan = corpus_lib.plan_splits(corpus)
    train = [d.key for d in corpus_lib.iter_split(corpus, "train", plan)]
    validation = [d.key for d in corpus_lib.iter_split(corpus, "validation", plan)]
    assert (len(train), len(validation)) == (plan.train, plan.validation) == want
    keys = sorted(train + validation)
    if fraction < 0.5 and n_docs > 1:  # the moved document is the one of lowest score
        assert validation == [min(keys, key=corpus_lib.key_score)] == [plan.to_eval]


# ----------------------------------------------------------------------------- text files


def test_text_glob_skips_empty_and_binary_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "sub" / "b.txt").write_text("second — ünïcode document\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "zeros.txt").write_bytes(b"\x00\x00\x00\x01")
    corpus = corpus_lib.find_corpus(DataConfig(source="text", path=str(tmp_path / "**" / "*.txt")))
    texts, stats = _texts(corpus)
    assert texts == {"a.txt": "first document\n", "sub/b.txt": "second — ünïcode document\n"}
    assert (stats.documents, stats.skipped) == (2, 4)
    assert stats.reasons == {"empty": 2, "not utf-8": 1, "binary": 1}


def test_glob_matching_nothing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.path") as err:
        corpus_lib.find_corpus(DataConfig(source="text", path=str(tmp_path / "*.nothing")))
    assert "\n" not in str(err.value)
    (tmp_path / "folder.txt").mkdir()  # a folder that matches is not a file
    with pytest.raises(ConfigError, match="matches no files"):
        corpus_lib.find_corpus(DataConfig(source="jsonl", path=str(tmp_path / "*.txt")))


def test_fingerprint_changes_with_files_and_settings(tmp_path):
    (tmp_path / "a.txt").write_text("one\n")
    cfg = DataConfig(source="text", path=str(tmp_path / "*.txt"))
    first = corpus_lib.find_corpus(cfg).fingerprint()
    assert corpus_lib.find_corpus(cfg).fingerprint() == first
    assert corpus_lib.find_corpus(DataConfig(source="text", path=cfg.path, eval_fraction=0.5)).fingerprint() != first
    (tmp_path / "a.txt").write_text("one, edited\n")
    os.utime(tmp_path / "a.txt", ns=(1, 1))
    second = corpus_lib.find_corpus(cfg).fingerprint()
    assert second != first
    (tmp_path / "b.txt").write_text("two\n")
    assert corpus_lib.find_corpus(cfg).fingerprint() not in (first, second)


# ----------------------------------------------------------------------------- jsonl


def test_jsonl_skips_malformed_lines_and_missing_keys(tmp_path):
    lines = [
        json.dumps({"text": "good one", "id": 1}),
        "{not json",
        json.dumps({"body": "wrong key"}),
        "",  # blank: not a record, not counted
        json.dumps({"text": 42}),
        json.dumps(["text", "a list"]),
        json.dumps({"text": "good two"}),
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "more.jsonl").write_bytes(json.dumps({"text": "good three"}).encode() + b"\n\xff\xfe\n")
    corpus = corpus_lib.find_corpus(DataConfig(source="jsonl", path=str(tmp_path / "*.jsonl")))
    texts, stats = _texts(corpus)
    assert texts == {"data.jsonl:1": "good one", "data.jsonl:7": "good two", "more.jsonl:1": "good three"}
    assert (stats.documents, stats.skipped) == (3, 5)
    assert stats.reasons == {"malformed json": 2, "no string 'text'": 3}
    assert "3 records from 2 files (5 skipped)" in corpus.describe(stats)


def test_jsonl_text_key(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "hello"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    corpus = corpus_lib.find_corpus(DataConfig(source="jsonl", path=str(tmp_path / "d.jsonl"), text_key="body"))
    texts, stats = _texts(corpus)
    assert texts == {"d.jsonl:1": "hello"} and stats.skipped == 1


def test_jsonl_seq2seq_examples_need_both_keys_and_are_fingerprinted_by_them(tmp_path):
    lines = [
        json.dumps({"q": "two plus two", "a": "four"}),
        json.dumps({"q": "no answer"}),
        json.dumps({"q": "blank answer", "a": "  "}),
        json.dumps({"a": "no question"}),
        json.dumps({"q": "one", "a": "1\x00"}),
        json.dumps({"q": "three", "a": "3", "text": "ignored"}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    data = DataConfig(source="jsonl", path=str(tmp_path / "d.jsonl"), input_key="q", target_key="a")
    corpus = corpus_lib.find_corpus(data, pairs=True)
    stats = corpus_lib.CorpusStats()
    docs = list(corpus_lib.iter_documents(corpus, stats))
    assert [(d.key, d.text, d.target) for d in docs] == [("d.jsonl:1", "two plus two", "four"),
                                                         ("d.jsonl:6", "three", "3")]
    assert stats.reasons == {"no string 'a'": 1, "no string 'q'": 1, "empty": 1, "binary": 1}
    assert stats.bytes == len("two plus twofourthree3")
    assert "2 examples from 1 files (4 skipped)" in corpus.describe(stats)
    # Either key changed: another prepared dataset; so is the text corpus of the same files.
    fingerprints = {corpus_lib.find_corpus(dataclasses.replace(data, **change), pairs=True).fingerprint()
                    for change in ({}, {"input_key": "question"}, {"target_key": "answer"})}
    assert len(fingerprints) == 3 and corpus_lib.find_corpus(data).fingerprint() not in fingerprints
    with pytest.raises(ConfigError, match="data.source=text holds text, but train.objective=seq2seq"):
        corpus_lib.find_corpus(dataclasses.replace(data, source="text"), pairs=True)


# ----------------------------------------------------------------------------- limits and units


def test_documents_with_a_line_over_the_limit_are_skipped_and_counted(tmp_path):
    (tmp_path / "ok.txt").write_text("short line\n" * 50)  # long file, short lines: kept
    (tmp_path / "minified.txt").write_text("x = 1\n" + "y" * 300 + "\n")
    (tmp_path / "wide.txt").write_text("é" * 60 + "\n")  # 120 bytes in UTF-8, 60 characters
    records = [{"text": "fine\nlines\n"}, {"text": "z" * 500}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = corpus_lib.find_corpus(DataConfig(source="text", path=str(tmp_path / "*.txt"), max_line_bytes=100))
    texts, stats = _texts(text)
    assert set(texts) == {"ok.txt"}
    assert stats.reasons == {"line too long": 2} and stats.bytes == len(b"short line\n") * 50
    jsonl = corpus_lib.find_corpus(DataConfig(source="jsonl", path=str(tmp_path / "*.jsonl"), max_line_bytes=100))
    texts, stats = _texts(jsonl)
    assert list(texts) == ["r.jsonl:1"] and stats.reasons == {"line too long": 1}
    unlimited = corpus_lib.find_corpus(DataConfig(source="text", path=str(tmp_path / "*.txt"), max_line_bytes=0))
    assert len(_texts(unlimited)[0]) == 3
    assert unlimited.fingerprint() != text.fingerprint()  # the limit decides the content: not reused


def test_binary_is_recognised_before_utf8_and_inside_json(tmp_path):
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8")  # NUL and not UTF-8
    (tmp_path / "fine.txt").write_text("text\n")
    texts, stats = _texts(corpus_lib.find_corpus(DataConfig(source="text", path=str(tmp_path / "*.txt"))))
    assert list(texts) == ["fine.txt"] and stats.reasons == {"binary": 1}
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a\u0000b"}) + "\n" + json.dumps({"text": "ok"}) + "\n")
    texts, stats = _texts(corpus_lib.find_corpus(DataConfig(source="jsonl", path=str(tmp_path / "d.jsonl"))))
    assert list(texts) == ["d.jsonl:2"] and stats.reasons == {"binary": 1}


def test_one_document_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  \nsecond line\n" + "w" * 200 + "\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    cfg = DataConfig(source="text", path=str(tmp_path / "*.txt"), text_unit="line", max_line_bytes=100)
    corpus = corpus_lib.find_corpus(cfg)
    texts, stats = _texts(corpus)
    assert texts == {"a.txt:1": "first line", "a.txt:4": "second line"}
    assert stats.reasons == {"line too long": 1, "empty": 1} and stats.documents == 2
    assert "2 lines from 2 files" in corpus.describe(stats)
    per_file = corpus_lib.find_corpus(DataConfig(source="text", path=cfg.path, max_line_bytes=100))
    assert per_file.fingerprint() != corpus.fingerprint()
