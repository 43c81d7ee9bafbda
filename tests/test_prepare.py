"""`llm-jax tokenizer train` and `llm-jax data prepare`, and training on what they prepared: bad input
is skipped, counted and reported in the run log; a changed process count resumes the data."""

import json

import pytest
from test_trainer import WORDS, _config

from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.data import corpus as corpus_lib
from llm_jax.data import position, tfds_builder
from llm_jax.train.loop import train
from llm_jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def messy_corpus(tmp_path_factory):
    """Forty learnable text files, plus an empty one and a binary one."""
    root = tmp_path_factory.mktemp("messy")
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(" ".join(WORDS[(i + j * 3) % len(WORDS)] for j in range(120)) + "\n")
    (root / "empty.txt").write_text("")
    (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00")
    return root


def _args(tmp_path, corpus, *extra):
    """The key=value list of `_config` for the command line."""
    return ["configs/tiny.yaml", f"workdir={tmp_path / 'run'}", "data.source=text", f"data.path={corpus}/*.txt",
            f"data.prepared_dir={tmp_path / 'prepared'}", "tokenizer.sample_bytes=100000", "train.progress=false",
            "train.seq_len=32", "train.batch_size=8", "data.eval_fraction=0.1", "data.num_shards=2", *extra]


def test_prepare_then_train_reuses_both_and_logs_the_skips(tmp_path, messy_corpus, capsys, caplog):
    caplog.set_level("INFO")
    assert main(["tokenizer", "train", *_args(tmp_path, messy_corpus), "--vocab-size", "300",
                 "--special-tokens", "<|sep|>", "--model-type", "bpe"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vocab_size"] == 300 and summary["user_defined_symbols"] == ["<|sep|>"]
    assert summary["held_out_bytes_per_token"] > 1.2  # 40 merges of a small vocabulary already help
    model = tmp_path / "run" / "tokenizer" / "spm.model"
    assert model.is_file() and (model.parent / "summary.json").is_file()

    assert main(["data", "prepare", *_args(tmp_path, messy_corpus, "model.vocab_size=300")]) == 0
    report = json.loads(capsys.readouterr().out)
    (stats,) = report["corpora"]
    assert report["tokenizer"] == str(model)  # the tokenizer trained above, not a new one
    assert (stats["documents"], stats["files"], stats["skipped"]) == (40, 42, 2)
    assert stats["skipped_reasons"] == {"binary": 1, "empty": 1}
    assert stats["splits"]["train"]["shards"] == 2
    assert stats["tokens"] == sum(s["tokens"] for s in stats["splits"].values()) > stats["bytes"] / 20
    assert "2 skipped: 1 binary, 1 empty" in caplog.text  # reported at the end of preparation

    caplog.clear()
    model_bytes = model.read_bytes()
    sep = 'tokenizer.user_defined_symbols=["<|sep|>"]'
    config = _config(tmp_path, messy_corpus, sep, "data.eval_fraction=0.1", "train.steps=10")
    train(config)
    assert "(reused)" in caplog.text and f"loading tokenizer {model}" in caplog.text
    assert "preparing" not in caplog.text and model.read_bytes() == model_bytes
    assert "data: 40 documents kept, 2 skipped: 1 binary, 1 empty" in caplog.text  # the run log

    # The same run resumed from two processes' saved data states (as if it had run on two hosts,
    # each saving its virtual shards): the shards are found in both files, training goes on.
    data_dir = tmp_path / "run" / "checkpoints" / "10" / "data"
    (saved,) = position.read_saved_states(data_dir).values()
    (data_dir / "process_0-of-1.json").unlink()
    shards = sorted(saved["shards"], key=int)
    for p, part in enumerate((shards[:len(shards) // 2], shards[len(shards) // 2:])):
        own = {**saved, "shards": {v: saved["shards"][v] for v in part}}
        (data_dir / f"process_{p}-of-2.json").write_text(json.dumps(own))
    caplog.clear()
    train(_config(tmp_path, messy_corpus, sep, "data.eval_fraction=0.1", "train.steps=15"))
    assert "resumed from step 10" in caplog.text and "older version" not in caplog.text
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == [5, 10, 15]


def test_training_on_jsonl_reports_malformed_and_keyless_records(tmp_path, caplog):
    caplog.set_level("INFO")
    records = [json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(80))}) for i in range(30)]
    records[3] = '{"text": "cut off'  # malformed
    records[7] = json.dumps({"body": "the text is under another key"})
    (tmp_path / "data.jsonl").write_text("\n".join(records) + "\n")
    config = _config(tmp_path, tmp_path, "data.source=jsonl", f"data.path={tmp_path}/data.jsonl", "train.steps=5",
                     "model.vocab_size=300")
    summary = train(config)
    assert summary["step"] == 5
    assert "data: 28 documents kept, 2 skipped: 1 malformed json, 1 no string 'text'" in caplog.text


@pytest.mark.parametrize("args, fragment", [
    (["train", "data.source=text", "data.path=/no/such/*.txt"], "matches no files"),
    (["data", "prepare", "data.source=tfds", "data.tfds_name=lm1b"], "nothing to prepare"),
    (["data", "prepare", "data.source=jsonl", "data.path=/no/such/*.jsonl"], "matches no files"),
])
def test_bad_data_exits_2_with_one_line(args, fragment, capsys, tmp_path):
    assert main([*args, f"workdir={tmp_path / 'run'}", "train.progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def _small_corpus(root):
    for i in range(6):
        (root / f"{i}.txt").write_text(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) + "\n")
    return corpus_lib.find_corpus(load_config(None, ["data.source=text", f"data.path={root}/*.txt",
                                                     "data.eval_fraction=0.3"]).data)


def test_a_first_preparation_does_not_warn_of_the_folder_it_is_about_to_write(tmp_path, caplog):
    (tmp_path / "c").mkdir()
    corpus = _small_corpus(tmp_path / "c")
    with caplog.at_level("INFO"):
        tfds_builder.prepare_corpus(corpus, tmp_path / "prepared")
    assert "preparing text corpus" in caplog.text
    assert "Variant folder" not in caplog.text


def test_fewer_shards_than_asked_is_said_with_the_key(tmp_path, caplog):
    (tmp_path / "c").mkdir()
    corpus = _small_corpus(tmp_path / "c")
    with caplog.at_level("INFO"):
        prepared = tfds_builder.prepare_corpus(corpus, tmp_path / "prepared", num_shards=50)
    shards = prepared.split_shards()
    assert max(shards.values()) < 50  # a split has fewer documents than that
    assert f"data.num_shards=50 is more than the {min(shards.values())} documents" in caplog.text


def test_preparation_draws_no_bars_into_a_redirected_log(tmp_path, capfd):
    (tmp_path / "c").mkdir()
    corpus = _small_corpus(tmp_path / "c")
    capfd.readouterr()
    # progress=True as in an interactive run, but stderr is a pipe here: bars would be carriage
    # returns and long lines in the log file.
    tfds_builder.prepare_corpus(corpus, tmp_path / "prepared", num_shards=2, progress=True)
    err = capfd.readouterr().err
    assert "\r" not in err and "examples/s" not in err and "file/s" not in err, err[:500]
