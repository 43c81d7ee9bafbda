"""Tests of llm_jax.data.examples: the fine-tuning examples written from the standard library."""

import json
import keyword

from llm_jax.config import load_config
from llm_jax.data import corpus as corpus_lib
from llm_jax.data import examples as ex
from llm_jax.data import labelled

MODULE_A = '''"""A module."""

import os


def short():
    return 1


def one_liner(): return "a body on the def line is left out"


@decorator
def walk(top, *,
         follow=False):
    """Walks the tree."""
    for name in os.listdir(top):
        yield os.path.join(top, name)


class Thing:
    def method(self, value):
        if value is None:
            raise ValueError("value must be given")
        return value * 2
'''


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_classify_example_holds_function_bodies_labelled_by_package(tmp_path):
    root = tmp_path / "lib"
    (root / "pkga" / "tests").mkdir(parents=True)
    (root / "pkga" / "mod.py").write_text(MODULE_A)
    (root / "pkga" / "tests" / "test_mod.py").write_text(
        "def test_it():\n    assert walk('.') is not None, 'a test, not the package'\n")
    (root / "pkgb").mkdir()
    (root / "pkgb" / "__init__.py").write_text("async def fetch(url):\n    response = await get(url)\n"
                                               "    return response.text.strip()\n")
    summary = ex.write_classify_example(tmp_path / "out", max_examples=10, packages=("pkga", "pkgb"), root=root)
    records = _read_jsonl(tmp_path / "out" / "train.jsonl") + _read_jsonl(tmp_path / "out" / "validation.jsonl")
    by_key = {r["key"]: (r["label"], r["text"]) for r in records}
    assert by_key == {
        "pkga/mod.py:walk": ("pkga", '"""Walks the tree."""\nfor name in os.listdir(top):\n'
                                     "    yield os.path.join(top, name)"),
        "pkga/mod.py:Thing.method": ("pkga", 'if value is None:\n    raise ValueError("value must be given")\n'
                                             "return value * 2"),
        "pkgb/__init__.py:fetch": ("pkgb", "response = await get(url)\nreturn response.text.strip()"),
    }
    for split in ("train", "validation"):
        for record in _read_jsonl(tmp_path / "out" / f"{split}.jsonl"):
            assert corpus_lib.is_eval_key(record["key"], ex.VALIDATION_FRACTION) == (split == "validation")
    assert summary["labels"] == {"pkga": 2, "pkgb": 1} and summary["train"] + summary["validation"] == 3
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_tagged_lines_follow_tokenize_categories_in_iob2():
    source = ('x = len(items)  # count the items\nif x > 10:\n    print(f"{x} is many", 0x1F)\n'
              "(a,\n b)\n")
    assert ex.tagged_lines(source) == [
        (1, ["x", "=", "len", "(", "items", ")", "#", "count", "the", "items"],
         ["B-NAME", "O", "B-BUILTIN", "O", "B-NAME", "O", "B-COMMENT", "I-COMMENT", "I-COMMENT", "I-COMMENT"]),
        (2, ["if", "x", ">", "10", ":"], ["B-KEYWORD", "B-NAME", "O", "B-NUMBER", "O"]),
        (3, ["print", "(", 'f"{x}', "is", 'many"', ",", "0x1F", ")"],
         ["B-BUILTIN", "O", "B-STRING", "I-STRING", "I-STRING", "O", "B-NUMBER", "O"]),
        (4, ["(", "a", ","], ["O", "B-NAME", "O"]),
        (5, ["b", ")"], ["B-NAME", "O"]),
    ]
    assert ex.tagged_lines("def broken(:\n    'unterminated\n") == []


def test_examples_from_a_slice_of_the_standard_library_read_back_as_labelled_data(tmp_path):
    summary = ex.write_classify_example(tmp_path / "cls", max_examples=40, packages=("json", "logging"))
    assert summary["labels"] == {"json": 20, "logging": 20}
    assert 0.5 <= summary["majority_baseline"] < 1
    config = load_config(None, ["task.kind=classify", "data.source=jsonl", f"data.path={tmp_path}/cls/train.jsonl",
                                f"data.eval_path={tmp_path}/cls/validation.jsonl"])
    sources = labelled.open_labelled(config)
    assert (len(sources.train), len(sources.eval)) == (summary["train"], summary["validation"])
    assert sources.labels.names == ("json", "logging") and not sources.skipped

    summary = ex.write_tag_example(tmp_path / "tag", max_sentences=60)
    config = load_config(None, ["task.kind=tag", "data.source=conll", f"data.path={tmp_path}/tag/train.conll",
                                f"data.eval_path={tmp_path}/tag/validation.conll"])
    sources = labelled.open_labelled(config)
    assert len(sources.train) + len(sources.eval) == 60 == summary["train"] + summary["validation"]
    assert set(sources.labels.names) <= {"O", *(f"{p}-{t}" for t in ex.TAG_TYPES for p in "BI")}
    for example in [*sources.train, *sources.eval]:
        assert len(example.words) <= ex.MAX_SENTENCE_WORDS and set(example.tags) != {"O"}
        for word, tag in zip(example.words, example.tags):
            assert (tag == "B-KEYWORD") == keyword.iskeyword(word) or tag.endswith(("STRING", "COMMENT"))
            assert tag != "B-BUILTIN" or word in ex.BUILTIN_NAMES
            assert tag != "B-COMMENT" or word.startswith("#")
