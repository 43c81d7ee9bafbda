"""Early stopping: the counting (fed metric sequences) and a run that stops, reports its best
checkpoint and resumes its counts exactly."""

from __future__ import annotations

import math

import pytest
from test_trainer import _config, corpus  # noqa: F401 - the corpus fixture

from llm_jax.config import ConfigError, EarlyStoppingConfig, load_config
from llm_jax.train import checkpoint as ckpt
from llm_jax.train.early_stopping import EarlyStopping, best_metric
from llm_jax.train.loop import train
from llm_jax.train.metrics import read_metrics


def _feed(stopper: EarlyStopping, values, start: int = 1) -> int | None:
    """Feeds `values` as the evals of steps start, start+1, ...; the step that stopped, or None."""
    for step, value in enumerate(values, start):
        if stopper.update(step, {stopper.metric: value}):
            return step
    return None


def test_counts_evaluations_without_improvement_in_either_direction():
    loss = EarlyStopping.from_config(EarlyStoppingConfig(metric="eval_loss", patience=2))
    assert loss.mode == "min"
    assert _feed(loss, [3.0, 2.0, 2.5, 1.9, 2.0, 2.0, 1.0]) == 6  # 1.9 reset the count
    assert (loss.best, loss.best_step, loss.evals_since_best) == (1.9, 4, 2)
    assert "eval_loss" in loss.reason() and "step 4" in loss.reason()

    f1 = EarlyStopping.from_config(EarlyStoppingConfig(metric="eval_f1", patience=2, min_delta=0.05))
    assert f1.mode == "max"
    # +0.04 is not more than min_delta: no improvement; a NaN never is one.
    assert _feed(f1, [0.5, 0.54, 0.6, math.nan, 0.62]) == 5
    assert (f1.best, f1.best_step) == (0.6, 3)
    assert EarlyStopping.from_config(EarlyStoppingConfig()) is None  # no metric: off


def test_restored_counts_make_the_same_decisions():
    values = [3.0, 2.0, 2.1, 2.2, 1.5, 1.6, 1.7, 1.8]
    whole = EarlyStopping("eval_loss", "min", patience=3)
    first = EarlyStopping("eval_loss", "min", patience=3)
    _feed(first, values[:3])
    resumed = EarlyStopping("eval_loss", "min", patience=3)
    resumed.restore(first.state_dict())
    assert _feed(whole, values) == _feed(resumed, values[3:], start=4) == 8
    assert whole.state_dict() == resumed.state_dict()
    other = EarlyStopping("eval_loss", "max", patience=3)  # saved for another direction: starts again
    other.restore(first.state_dict())
    assert other.best is None


def test_bad_settings_are_one_line():
    for override, words in [("train.early_stopping.metric=eval_f1", "train.early_stopping.metric"),
                            ("train.early_stopping.patience=0", "patience"),
                            ("train.early_stopping.mode=down", "mode"),
                            ("train.early_stopping.min_delta=-1", "min_delta")]:
        with pytest.raises(ConfigError, match=words) as error:
            load_config(None, [override])
        assert "\n" not in str(error.value)


_STOPPING = ["train.early_stopping.metric=eval_loss", "train.early_stopping.patience=2", "train.eval_every=3",
             "checkpoint.every=100", "checkpoint.keep=1", "optimizer.decay_steps=60", "optimizer.warmup_steps=2",
             "optimizer.lr=0.3", "train.sample_tokens=1", "train.eval_batches=2"]  # lr 0.3 soon wrecks the model


def test_a_run_stops_reports_its_best_checkpoint_and_resumes_its_counts(tmp_path, corpus):  # noqa: F811
    # Cut short one eval after its best (step 12), then resumed: the counts go on from the checkpoint.
    first = train(_config(tmp_path, corpus, "train.steps=15", *_STOPPING))
    assert first["early_stopping"]["reason"].startswith("ran to") and first["step"] == 15
    assert first["early_stopping"]["best_step"] < 15  # a count started again would stop one eval later
    config = _config(tmp_path, corpus, "train.steps=60", *_STOPPING)
    summary = train(config)
    workdir = tmp_path / "run"
    evals = [r for r in read_metrics(workdir / "metrics.jsonl") if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])
    stopped = summary["step"]
    assert stopped < 60 and not summary["stopped_early"]  # stopped by the metric, not a signal
    assert [r["step"] for r in evals][-3:] == [best["step"], best["step"] + 3, best["step"] + 6] == \
        [stopped - 6, stopped - 3, stopped]
    whole = EarlyStopping("eval_loss", "min", patience=2)  # where a run never interrupted stops
    assert (_feed_rows(whole, evals), whole.best_step) == (stopped, best["step"])
    assert summary["best_step"] == summary["early_stopping"]["best_step"] == best["step"]
    assert summary["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-5)  # the best's, not the last's
    assert "has not improved" in summary["early_stopping"]["reason"]
    # The best beside the newest (checkpoint.keep=1), and the metric ranks it.
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == \
        [best["step"], stopped]
    reader = ckpt.Checkpointer(workdir / "checkpoints", config.checkpoint, read_only=True,
                               best=best_metric(config), keep_best=True)
    assert reader.best_step() == best["step"]
    reader.close()


def _feed_rows(stopper: EarlyStopping, rows) -> int | None:
    for row in rows:
        if stopper.update(row["step"], row):
            return row["step"]
    return None
