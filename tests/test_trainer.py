"""End-to-end runs of the trainer on a tiny corpus: loss falls, outputs exist, resume continues."""


import pytest

from llm_jax.config import ConfigError, load_config
from llm_jax.train.loop import train
from llm_jax.train.metrics import read_metrics

WORDS = ("the cat sat on the mat and the dog ran to the park where the birds sang all day long "
         "while children played games in the warm sun before going home for dinner").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Forty small repetitive documents: learnable in a few dozen steps."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        words = [WORDS[(i + j * 3) % len(WORDS)] for j in range(120)]
        (root / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n")
    return root


def _config(tmp_path, corpus, *extra):
    return load_config("configs/tiny.yaml", [
        f"workdir={tmp_path / 'run'}", "data.source=text", f"data.path={corpus}/*.txt",
        f"data.prepared_dir={tmp_path / 'prepared'}", "model.vocab_size=300", "tokenizer.sample_bytes=100000",
        "train.progress=false", "train.seq_len=32", "train.batch_size=8", "train.eval_every=20",
        "train.log_every=5", "checkpoint.every=10", "optimizer.lr=3e-3", "optimizer.warmup_steps=5",
        "train.sample_tokens=8", *extra])


def test_short_run_learns_and_writes_the_run_directory(tmp_path, corpus):
    config = _config(tmp_path, corpus, "train.steps=40")
    summary = train(config)
    workdir = tmp_path / "run"
    rows = read_metrics(workdir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "data_wait_frac", "mfu"):
        assert key in train_rows[0]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0
    assert [r["step"] for r in eval_rows] == [20, 40]
    assert eval_rows[-1]["eval_perplexity"] == pytest.approx(2.718281828 ** eval_rows[-1]["eval_loss"], rel=1e-6)
    assert summary["eval_loss"] == eval_rows[-1]["eval_loss"]
    assert isinstance(summary["sample"], str)
    assert (workdir / "config.yaml").is_file()
    assert (workdir / "tokenizer" / "spm.model").is_file()
    assert list((workdir / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [20, 30, 40]


def test_resume_continues_where_it_stopped(tmp_path, corpus):
    train(_config(tmp_path, corpus, "train.steps=15"))
    train(_config(tmp_path, corpus, "train.steps=25"))
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    # Step 15 was checkpointed at the end of the first run; the second starts at 16, not at 1.
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25]


def test_resume_matches_an_uninterrupted_run(tmp_path, corpus):
    whole = tmp_path / "whole"
    # A fixed schedule length, so that stopping at step 10 changes nothing about steps 1..10.
    train(_config(whole, corpus, "train.steps=20", "optimizer.decay_steps=20"))
    parts = tmp_path / "parts"
    train(_config(parts, corpus, "train.steps=10", "optimizer.decay_steps=20"))
    train(_config(parts, corpus, "train.steps=20", "optimizer.decay_steps=20"))
    a = [r for r in read_metrics(whole / "run" / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_metrics(parts / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), ra["step"]


def test_a_resumed_run_must_keep_its_model(tmp_path, corpus):
    train(_config(tmp_path, corpus, "train.steps=5"))
    with pytest.raises(ConfigError, match="model.n_layers"):
        train(_config(tmp_path, corpus, "train.steps=10", "model.n_layers=3"))


def test_the_console_shows_each_eval_and_no_cpu_mfu_on_the_bar(tmp_path, corpus, capfd, caplog):
    config = _config(tmp_path, corpus, "train.steps=10", "train.eval_every=5", "train.progress=true")
    with caplog.at_level("INFO"):
        train(config)
    # Each evaluation is said as it happens, not only written to metrics.jsonl.
    evals = [line for line in caplog.messages if "eval loss" in line]
    assert [line.split(":")[0] for line in evals] == ["step 5", "step 10"]
    # The bar is drawn with its throughput, but an MFU against a CPU peak measured on shared cores is not.
    err = capfd.readouterr().err
    assert "tok_s=" in err and "mfu=" not in err


def test_a_resume_that_changes_the_target_length_says_the_data_changed():
    """An encoder-decoder's train.target_len cuts its span-corruption pieces (data/objectives.py), as
    train.seq_len does: the batches after the saved data position are not those of the first run."""
    from llm_jax.config import to_dict
    from llm_jax.train.loop import _data_changes

    saved = to_dict(load_config(None, ["model.arch=t5"]))
    assert _data_changes(saved, to_dict(load_config(None, ["model.arch=t5", "train.target_len=16"]))) == [
        "train.target_len 0 -> 16"]
    assert _data_changes(saved, saved) == []
