"""BERT (masked LM) end to end: eval accuracy, `eval`, `fill-mask`, export and init_from, and an exact
resume after SIGTERM and SIGKILL through the CLI (masks are a function of seed and data position)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_encoder import random_params, tiny
from test_fault_tolerance import _cli_args, _train_rows
from test_trainer import _config, corpus  # noqa: F401 - the corpus fixture

from llm_jax import cli
from llm_jax.commands.export import export_run
from llm_jax.config import ConfigError
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.infer.fill_mask import encode_with_masks, fill_mask
from llm_jax.models.encoder import Encoder
from llm_jax.train import loop
from llm_jax.train.loop import train
from llm_jax.train.metrics import read_metrics

ROOT = Path(__file__).parent.parent
BERT = ("model.arch=bert", "optimizer.decay_steps=12", "train.sample_prompt=the cat [MASK] on the mat")


def twelve_step_run(root: Path, corpus: Path, family: tuple[str, ...]) -> tuple[Path, dict]:  # noqa: F811
    """One finished 12-step run of `family`, a row per step, evaluated at 6 and 12, checkpoints at 6 and 12."""
    summary = train(_config(root, corpus, *family, "train.steps=12", "train.log_every=1", "train.eval_every=6",
                            "checkpoint.every=6"))
    return root / "run", summary


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, corpus):  # noqa: F811
    return twelve_step_run(tmp_path_factory.mktemp("bert"), corpus, BERT)


def test_a_bert_run_learns_and_reports_masked_accuracy(bert_run, capsys):
    workdir, summary = bert_run
    rows = read_metrics(workdir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in eval_rows] == [6, 12]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    for row in eval_rows:
        assert 0.0 <= row["eval_accuracy"] <= 1.0
    assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]
    assert eval_rows[-1]["eval_accuracy"] > 0.1  # chance is 1/300; "the" alone is most of this corpus
    assert summary["eval_accuracy"] == eval_rows[-1]["eval_accuracy"]
    assert summary["sample"].startswith("[MASK] 1: ")  # the final model fills the sample prompt's mask

    assert cli.main(["eval", str(workdir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 12
    assert result["eval_accuracy"] == pytest.approx(eval_rows[-1]["eval_accuracy"], abs=1e-6)
    assert result["eval_loss"] == pytest.approx(eval_rows[-1]["eval_loss"], rel=1e-5)


def test_fill_mask_ranks_candidates_for_each_mask(bert_run, capsys):
    workdir, _ = bert_run
    assert cli.main(["fill-mask", str(workdir), "--text", "the [MASK] sat on the [MASK]", "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["[MASK] 1", "[MASK] 2"]
    for line in lines:
        probabilities = [float(part.rsplit(" ", 1)[1]) for part in line.split(": ", 1)[1].split(" | ")]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1.0 + 1e-6

    assert cli.main(["fill-mask", str(workdir), "--text", "no mask here"]) == 2
    assert "holds no [MASK]" in capsys.readouterr().err
    assert cli.main(["fill-mask", str(workdir), "--text", "[MASK]", "--top-k", "0"]) == 2
    assert cli.main(["generate", str(workdir), "--prompt", "the"]) == 2
    assert "fill-mask" in capsys.readouterr().err


def test_bert_export_then_init_from(bert_run, tmp_path, corpus):  # noqa: F811
    workdir, _ = bert_run
    out = tmp_path / "exported"
    assert export_run(workdir, out)["step"] == 12
    tuned = train(_config(tmp_path / "tuned", corpus, *BERT, "train.steps=1", "train.log_every=1", f"init_from={out}"))
    assert tuned["step"] == 1  # a fresh run from the exported parameters
    first = _train_rows(tmp_path / "tuned" / "run")[0]["loss"]
    trained = _train_rows(workdir)[-1]["loss"]
    assert first == pytest.approx(trained, abs=0.5)  # the exported encoder, on another batch
    assert first < np.log(300) - 1.0  # a random init starts near ln(vocab_size)


def _start(tmp_path, corpus, *extra, family=BERT):  # noqa: F811
    """`llm-jax train` of the tiny `family` run (BERT by default; test_t5.py starts t5 runs)."""
    return subprocess.Popen([sys.executable, "-m", "llm_jax.cli", *_cli_args(tmp_path, corpus, *family, *extra)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, workdir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    def last_step() -> int:
        rows = _train_rows(workdir) if (workdir / "metrics.jsonl").exists() else []
        return rows[-1]["step"] if rows else 0

    while time.time() < deadline and proc.poll() is None and last_step() < step:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-3000:]


def check_sigterm_sigkill_resume(tmp_path, corpus, family, whole_workdir: Path) -> None:  # noqa: F811
    """Through the CLI: SIGTERM saves and exits 0, SIGKILL loses only the steps after the last checkpoint,
    and the resumed run's losses are those of the uninterrupted 12-step run in `whole_workdir`, step for
    step (masks and spans are a function of the seed and the data position). test_t5.py runs it for t5."""
    workdir = tmp_path / "run"
    args = ("train.steps=12", "train.log_every=1", "train.eval_every=6", "checkpoint.async_save=false")
    first = _start(tmp_path, corpus, *args, "checkpoint.every=100", family=family)
    _wait_for_step(first, workdir, 3)
    first.send_signal(signal.SIGTERM)  # finishes its step, saves it, exits 0
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]

    second = _start(tmp_path, corpus, *args, "checkpoint.every=2", family=family)
    _wait_for_step(second, workdir, 9)
    second.send_signal(signal.SIGKILL)  # loses the steps after its last checkpoint
    second.communicate(timeout=60)

    train(_config(tmp_path, corpus, *family, *args, "checkpoint.every=2"))
    resumed: dict[int, float] = {}
    for row in _train_rows(workdir):  # a step run twice (after SIGKILL) counts as its last run
        resumed[row["step"]] = row["loss"]
    whole = {row["step"]: row["loss"] for row in _train_rows(whole_workdir)}
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-5), step


def test_sigterm_and_sigkill_then_resume_match_the_uninterrupted_run(bert_run, tmp_path, corpus):  # noqa: F811
    check_sigterm_sigkill_resume(tmp_path, corpus, BERT, bert_run[0])


def test_fill_mask_reads_the_space_before_a_mask_as_part_of_it(bert_run):
    """Training masks whole pieces, a word's leading space included (' sat'); a lone ' ' before the
    mask would be a context the model never saw there."""
    tok = Tokenizer(bert_run[0] / "tokenizer" / "spm.model")
    ids_1L, masks = encode_with_masks(tok, " [MASK] cat [MASK] on the  [MASK]", max_len=64)
    m = tok.mask_id
    expected = [tok.cls_id, m, *tok.encode(" cat"), m, *tok.encode(" on the "), m, tok.sep_id]
    assert ids_1L[0].tolist() == expected and masks.tolist() == [1, 1 + len(tok.encode(" cat")) + 1, len(expected) - 2]


def test_a_sample_prompt_the_encoder_cannot_read_is_refused_before_the_first_step(tmp_path, corpus):  # noqa: F811
    long_prompt = "train.sample_prompt=" + "the cat [MASK] on the mat " * 8
    with pytest.raises(ConfigError, match=r"^train.sample_prompt is \d+ tokens .* at most 32 \(model.max_len\)$"):
        train(_config(tmp_path, corpus, *BERT, "model.max_len=32", long_prompt, "train.steps=1"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_failing_final_sample_still_finishes_the_last_save(bert_run, tmp_path, corpus, monkeypatch):  # noqa: F811
    def fails(setup, params):
        raise RuntimeError("final sample failed")

    monkeypatch.setattr(loop, "_final_sample", fails)
    with pytest.raises(RuntimeError, match="final sample failed"):
        train(_config(tmp_path, corpus, *BERT, "train.steps=2", "checkpoint.every=2"))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]  # not 2.orbax-checkpoint-tmp


def test_fill_mask_ranks_only_the_tokenizers_ids_when_model_vocab_is_larger(bert_run):
    """model.vocab_size may exceed the tokenizer's; the rows past it are no token and cannot be shown."""
    tok = Tokenizer(bert_run[0] / "tokenizer" / "spm.model")
    config = tiny(vocab_size=tok.vocab_size + 20)
    params = random_params(config)
    params["mlm_head"]["bias"] = params["mlm_head"]["bias"].at[tok.vocab_size:].set(50.0)  # they would rank first
    candidates = fill_mask(Encoder(config), params, tok, "the [MASK] sat", top_k=3, max_len=config.max_len)
    assert [len(mask) for mask in candidates] == [3]
    assert all(c.id < tok.vocab_size for c in candidates[0])
    assert sum(c.probability for c in candidates[0]) <= 1.0 + 1e-6


def test_an_eval_set_without_a_masked_token_is_refused_before_the_first_step(tmp_path, corpus):  # noqa: F811
    """One piece `[CLS] t [SEP]` is masked with probability 0.15: an eval set of it alone may hold no
    masked token, and would score loss 0, perplexity 1, as if the model were perfect."""
    tiny_eval = ("train.seq_len=3", "train.batch_size=1", "train.eval_batches=1", "train.steps=1")
    with pytest.raises(ConfigError, match=r"^the held-out batches hold no masked token .* raise train.eval_batches"):
        train(_config(tmp_path, corpus, *BERT, *tiny_eval))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_empty_eval_split_skips_evaluation_for_masked_lm_too(monkeypatch):
    """Only a held-out set that exists but holds no masked token is refused; none at all is allowed."""
    setup = SimpleNamespace(config=_config(Path("unused"), Path("unused"), *BERT), tokenizer=None, sources=None,
                            mesh=None, labels=None)
    monkeypatch.setattr(loop.mesh_lib, "batch_rows", lambda mesh, rows: None)
    monkeypatch.setattr(loop.data_lib, "make_eval_batches", lambda *args: [])
    assert loop.held_out_batches(setup) == []
