"""What the training loop tells: train rows of metrics.jsonl, the progress bar, one line per eval.

The host trails the device: a logged step's metrics are fetched only after the next step has been
dispatched (`due`, then `flush`). Throughput is measured between two reports, and time spent in
eval and checkpointing is not training time (`paused`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax

from llm_jax.config import Config
from llm_jax.models import flops
from llm_jax.train.fault_tolerance import NonFiniteGuard
from llm_jax.train.metrics import MetricsWriter

log = logging.getLogger(__name__)


class Reporter:
    """Train metrics of the logged steps, with throughput, data wait and MFU since the last report."""

    def __init__(self, config: Config, writer: MetricsWriter, guard: NonFiniteGuard, start: int,
                 peak_flops: float | None, show_progress: bool):
        self.config = config
        self.writer = writer
        self.guard = guard
        self.peak_flops = peak_flops
        self.tokens_per_step = config.train.batch_size * flops.tokens_per_row(config)
        self.bar = _progress_bar(config, start) if show_progress else None
        self.pending = None  # (step, device metrics) of the last dispatched step that is due for logging
        self.clock_time = time.perf_counter()
        self.clock_step = start
        self.data_wait_s = 0.0
        self.paused_s = 0.0

    def waited_for_data(self, seconds: float) -> None:
        self.data_wait_s += seconds

    def paused(self, seconds: float) -> None:
        self.paused_s += seconds

    def start_clock(self, step: int) -> None:
        """After the first step, which compiles: throughput counts from here."""
        self.clock_time, self.clock_step, self.data_wait_s = time.perf_counter(), step, 0.0

    def due(self, step: int, device_metrics) -> None:
        """`step` is to be logged; its metrics are fetched at the next `flush`, after one more step."""
        self.pending = (step, device_metrics)

    def flush(self) -> None:
        if self.pending is not None:
            self._report(*self.pending)
            self.pending = None

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def eval_done(self, step: int, result: dict[str, float]) -> None:
        self.writer.write(step, result)
        log_eval(self.bar, step, result)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _report(self, step: int, device_metrics) -> None:
        host = jax.device_get(device_metrics)  # blocks until `step` is done; step + 1 is queued
        now = time.perf_counter()
        elapsed = max(now - self.clock_time - self.paused_s, 1e-9)
        row = {"loss": float(host["loss"]), "lr": float(host["lr"]), "grad_norm": float(host["grad_norm"]),
               "tokens_per_sec": (step - self.clock_step) * self.tokens_per_step / elapsed,
               "data_wait_frac": min(self.data_wait_s / elapsed, 1.0)}
        step_mfu = flops.mfu(row["tokens_per_sec"], self.config, self.peak_flops)
        if step_mfu is not None:
            row["mfu"] = step_mfu
        self.guard.read_through(step)
        row["nonfinite_steps"] = self.guard.total  # steps skipped so far, this one included
        self.writer.write(step, row)
        if self.bar is not None:
            # On CPU the peak is one short matmul measured on cores other processes share: an MFU
            # against it says little, so the bar shows it on accelerators only (metrics.jsonl keeps it).
            mfu_shown = {"mfu": f"{row['mfu']:.1%}"} if "mfu" in row and jax.default_backend() != "cpu" else {}
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}", **mfu_shown,
                                 refresh=False)
        self.clock_time, self.clock_step, self.data_wait_s, self.paused_s = now, step, 0.0, 0.0


def log_eval(bar: Any, step: int, result: dict[str, float]) -> None:
    """One console line per evaluation, as it happens (metrics.jsonl has them too, but no one watches it)."""
    message = f"step {step}: eval loss {result['eval_loss']:.4f}, eval perplexity {result['eval_perplexity']:.2f}"
    for key in ("eval_accuracy", "eval_macro_f1", "eval_precision", "eval_recall", "eval_f1"):  # by task
        if key in result:
            message += f", {key.replace('_', ' ')} {result[key]:.4f}"
    if bar is None:
        log.info(message)
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # printed above the bar rather than through it
        log.info(message)


def _progress_bar(config: Config, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=config.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1.0)
