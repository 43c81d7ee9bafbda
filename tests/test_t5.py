"""T5 (span corruption) end to end: a run's target loss and eval, `eval` and `generate` on its run
directory, export and init_from. That a stopped run resumes exactly (the corruption is a function
of seed and data position) is checked with the process counts, in test_multiprocess.py."""

import json

import numpy as np
import pytest
from test_bert import check_sigterm_sigkill_resume, twelve_step_run
from test_fault_tolerance import _train_rows
from test_trainer import _config, corpus  # noqa: F401 - the corpus fixture

from llm_jax import cli
from llm_jax.commands.export import export_run
from llm_jax.config import ConfigError
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.train.loop import check_workdir_matches, train
from llm_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # collected first (conftest.py)

# 10 sentinels: the tiny vocabulary (300) holds them beside the byte pieces; pieces of train.seq_len
# 32 need 2.
T5 = ("model.arch=t5", "tokenizer.extra_ids=10", "optimizer.decay_steps=12", "train.sample_tokens=6",
      "train.sample_prompt=the cat <extra_id_0> on the <extra_id_1>")


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, corpus):  # noqa: F811
    return twelve_step_run(tmp_path_factory.mktemp("t5"), corpus, T5)


def test_a_t5_run_learns_its_targets_and_evaluates_like_any_run(t5_run, capsys):
    workdir, summary = t5_run
    rows = read_metrics(workdir / "metrics.jsonl")
    train_rows, eval_rows = _train_rows(workdir), [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    assert [r["step"] for r in eval_rows] == [6, 12]
    assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]
    assert eval_rows[-1]["eval_perplexity"] == pytest.approx(np.exp(eval_rows[-1]["eval_loss"]), rel=1e-6)
    assert summary["eval_loss"] == eval_rows[-1]["eval_loss"]
    assert isinstance(summary["sample"], str)  # the target the final model writes for the sample prompt

    assert cli.main(["eval", str(workdir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 12
    assert result["eval_loss"] == pytest.approx(eval_rows[-1]["eval_loss"], rel=1e-5)


def test_generate_writes_the_target_of_a_prompt_with_sentinels(t5_run, capsys):
    workdir, _ = t5_run
    assert cli.main(["generate", str(workdir), "--prompt", "the cat <extra_id_0> on the mat", "--temperature", "0",
                     "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    # Every target of training starts with the first sentinel: 12 steps teach that much, and the
    # sentinel reads back as its own text, not as pieces of it.
    assert text.startswith("<extra_id_0>"), text
    tok = Tokenizer(workdir / "tokenizer" / "spm.model")
    assert len(tok.encode(text)) <= 5  # at most max-new-tokens (eos, if generated, shows no text)


def test_generate_a_file_of_prompts_with_beams_and_score_a_text(t5_run, tmp_path, capsys):
    """The encoder-decoder through the batched commands: JSONL prompts of two lengths, beam search,
    records; eval --input's bits per byte of a text."""
    workdir, _ = t5_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat <extra_id_0> on the mat"}\n{"prompt": "a <extra_id_0>"}\n')
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", str(workdir), "--input", str(prompts), "--output", str(out), "--num-beams", "2",
                     "--num-return-sequences", "2", "--max-new-tokens", "4", "--early-stopping"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["the cat <extra_id_0> on the mat"] * 2 + ["a <extra_id_0>"] * 2
    for first, second in (records[:2], records[2:]):
        assert first["score"] >= second["score"] and first["tokens"] != second["tokens"]
    assert all(r["finish_reason"] in ("eos", "length") and len(r["tokens"]) <= 4 for r in records)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 3)
    assert cli.main(["eval", str(workdir), "--input", str(text)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bytes"] == len(text.read_text().encode()) and report["tokens"] > 0
    nats = report["eval_loss"] * report["tokens"]
    assert report["bits_per_byte"] == pytest.approx(nats / np.log(2) / report["bytes"])


def test_t5_export_then_init_from(t5_run, tmp_path, corpus):  # noqa: F811
    workdir, _ = t5_run
    out = tmp_path / "exported"
    assert export_run(workdir, out)["step"] == 12
    tuned = train(_config(tmp_path / "tuned", corpus, *T5, "train.steps=1", "train.log_every=1", f"init_from={out}"))
    assert tuned["step"] == 1  # a fresh run from the exported parameters
    first = _train_rows(tmp_path / "tuned" / "run")[0]["loss"]
    assert first == pytest.approx(_train_rows(workdir)[-1]["loss"], abs=0.5)  # the exported model, on another batch
    assert first < np.log(300) - 1.0  # a random init starts near ln(vocab_size)


def test_a_span_run_resumed_as_seq2seq_is_refused(t5_run, tmp_path):
    # Both objectives build the same tree, so only the saved config tells them apart: a resume on the
    # other one would go on with the span run's moments, schedule and data position without a word.
    workdir, _ = t5_run
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"input": "a b", "target": "b a"}) + "\n")
    config = _config(workdir.parent, "unused", *T5, "train.steps=20", "train.objective=seq2seq",
                     "data.source=jsonl", f"data.path={pairs}")
    with pytest.raises(ConfigError, match="train.objective: checkpoint .* was trained with train.objective=span, "
                                          "this config says seq2seq"):
        check_workdir_matches(config, workdir)
    check_workdir_matches(_config(workdir.parent, "unused", *T5, "train.steps=20"), workdir)  # span resumes


def test_generate_reads_the_run_tokenizer_not_its_data(t5_run, capsys, monkeypatch):
    # The corpus a run trained on may be gone (or be a big one to prepare again): generation needs
    # the run's own tokenizer and checkpoint alone.
    workdir, _ = t5_run

    def no_data(config):
        raise ConfigError(f"data.path={config.data.path!r} matches no files")

    monkeypatch.setattr("llm_jax.data.pipeline.open_sources", no_data)
    assert cli.main(["generate", str(workdir), "--prompt", "the cat <extra_id_0>", "--temperature", "0",
                     "--max-new-tokens", "3"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("<extra_id_0>")


def test_sigterm_and_sigkill_then_resume_match_the_uninterrupted_run(t5_run, tmp_path, corpus):  # noqa: F811
    check_sigterm_sigkill_resume(tmp_path, corpus, T5, t5_run[0])
