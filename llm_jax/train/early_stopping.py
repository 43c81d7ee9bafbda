"""Early stopping: stop a run whose held-out metric has stopped improving.

The loop feeds every evaluation to `EarlyStopping.update`; after `patience` evaluations in a row
without an improvement of more than `min_delta` over the best so far, the run stops. The counters
(best value, its step, evaluations since) travel in each checkpoint's metadata (`state_dict`,
`from_state`), so a resumed run counts on exactly where the interrupted one was: the checkpoint of
step s holds the counters after the evaluation of step s, as the loop evaluates before it saves.
The best checkpoint itself is kept by the checkpointer, ranked by the same metric (`best_metric`).
"""

from __future__ import annotations

import dataclasses
import math

from llm_jax.config import Config, ConfigError, EarlyStoppingConfig

# Metrics where lower is better; every other eval metric (accuracy, F1, ...) is better higher.
_LOWER_IS_BETTER = ("eval_loss", "eval_perplexity")


def resolved_mode(metric: str, mode: str | None) -> str:
    """min or max: `mode`, or the metric's own direction."""
    if mode is not None:
        return mode
    return "min" if metric in _LOWER_IS_BETTER else "max"


def best_metric(config: Config) -> tuple[str, str]:
    """(metric, min|max) that ranks checkpoints for `checkpoint.keep_best`: the early-stopping metric
    when one is set, otherwise the eval loss."""
    es = config.train.early_stopping
    if es.metric:
        return es.metric, resolved_mode(es.metric, es.mode)
    return "eval_loss", "min"


@dataclasses.dataclass
class EarlyStopping:
    """The early-stopping state of one run; `update` once per evaluation, in step order."""

    metric: str
    mode: str  # min | max
    patience: int
    min_delta: float = 0.0
    best: float | None = None  # the best value so far
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_at: int | None = None  # the step of the evaluation that stopped the run

    @classmethod
    def from_config(cls, config: EarlyStoppingConfig) -> EarlyStopping | None:
        """None when `train.early_stopping.metric` is empty (early stopping off)."""
        if not config.metric:
            return None
        return cls(config.metric, resolved_mode(config.metric, config.mode), config.patience, config.min_delta)

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def update(self, step: int, result: dict[str, float]) -> bool:
        """Takes the evaluation of `step`; True when the run should stop now.

        A non-finite value never improves (a diverging run must not rank its NaN as best).
        """
        if self.metric not in result:
            raise ConfigError(f"train.early_stopping.metric={self.metric} is not among this run's eval metrics "
                              f"({', '.join(sorted(result))})")
        value = float(result[self.metric])
        if math.isfinite(value) and self.improves(value):
            self.best, self.best_step, self.evals_since_best = value, step, 0
        else:
            self.evals_since_best += 1
        if self.evals_since_best >= self.patience:
            self.stopped_at = step
        return self.stopped

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def reason(self) -> str:
        """Why the run stopped, in one line (for the log and the final summary)."""
        return (f"early stopping at step {self.stopped_at}: {self.metric} has not improved by more than "
                f"{self.min_delta:g} for {self.evals_since_best} evaluations (patience {self.patience}); the best, "
                f"{self.best:.6g}, was at step {self.best_step}")

    def summary(self, step: int, total_steps: int, interrupted: bool) -> dict:
        """The final summary's `early_stopping`: the best and why the run ended where it did."""
        if self.stopped:
            reason = self.reason()
        elif interrupted:
            reason = f"interrupted at step {step}: the counts go on when the run resumes"
        else:
            reason = f"ran to train.steps={total_steps} without stopping early"
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step, "reason": reason}

    def state_dict(self) -> dict:
        """What a checkpoint's metadata keeps (JSON)."""
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_step": self.best_step,
                "evals_since_best": self.evals_since_best, "stopped_at": self.stopped_at}

    def restore(self, saved: dict | None) -> None:
        """Continues the counts of a checkpoint's metadata. Saved for another metric or direction (the
        setting changed since), the counts mean nothing here and start again."""
        if not saved or saved.get("metric") != self.metric or saved.get("mode") != self.mode:
            return
        self.best, self.best_step = saved.get("best"), saved.get("best_step")
        self.evals_since_best = int(saved.get("evals_since_best", 0))
        # A raised patience lets a stopped run go on.
        self.stopped_at = saved.get("stopped_at") if self.evals_since_best >= self.patience else None
