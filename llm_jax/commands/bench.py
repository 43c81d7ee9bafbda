"""`llm-jax bench`: how fast the compiled train step runs, on synthetic tokens.

The step is the one `llm-jax train` runs (same jit, shardings and donation), timed as the median
of `steps` steps after compilation and `warmup` steps. FLOPs per token and the device peak behind
`mfu` are defined in `flops.py`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import numpy as np

from llm_jax.config import Config, ConfigError
from llm_jax.models.decoder import count_params
from llm_jax.models.flops import flops_per_token, mfu, tokens_per_row, total_peak_flops


def _one_document(rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and positions of rows that each hold one document, no padding."""
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    return np.ones((rows, length), np.int32), positions


def synthetic_batch(config: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length single-document rows of random tokens: the step costs the same as real data.
    Masked LM weighs 15% of the positions, as its masking does (the step computes every position).
    An encoder-decoder's rows have both sides (data/pipeline.py): seq_len encoder inputs and
    target_len targets, every target weighted, the decoder's inputs the targets shifted right
    after the decoder start id 0."""
    rng = np.random.default_rng(seed)
    b, length, vocab = config.train.batch_size // jax.process_count(), config.train.seq_len, config.model.vocab_size
    if config.model.family.encoder_decoder:
        target_len = config.target_len
        encoder_segment_ids, encoder_positions = _one_document(b, length)
        segment_ids, positions = _one_document(b, target_len)
        targets = rng.integers(4, vocab, size=(b, target_len), dtype=np.int32)
        return {"encoder_inputs": rng.integers(4, vocab, size=(b, length), dtype=np.int32),
                "encoder_segment_ids": encoder_segment_ids, "encoder_positions": encoder_positions,
                "inputs": np.pad(targets[:, :-1], ((0, 0), (1, 0))), "targets": targets,
                "segment_ids": segment_ids, "positions": positions, "weights": np.ones((b, target_len), np.float32)}
    tokens = rng.integers(4, vocab, size=(b, length + 1), dtype=np.int32)
    weights = np.ones((b, length), np.float32)
    if config.objective == "mlm":
        weights = (rng.random((b, length)) < 0.15).astype(np.float32)
    segment_ids, positions = _one_document(b, length)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids, "positions": positions,
            "weights": weights}


def _peak_memory_bytes(compiled, device: jax.Device) -> int | None:
    """The allocator's peak where the device reports one (GPU, TPU); else XLA's plan for the step:
    arguments + outputs + temporaries, less the donated buffers that outputs reuse."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def _temp_memory_bytes(compiled) -> int | None:
    """XLA's temporary buffers for one step on one device: mostly the activations the backward pass
    keeps, which is what rematerialisation trades for recomputation."""
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def compile_train_step(config: Config):
    """(setup, compiled train step, fresh state, synthetic device batch, compile seconds)."""
    from llm_jax.train import loop

    if config.parallel.mode == "pmap":
        raise ConfigError("llm-jax bench times the compiled sharded step: use parallel.mode=jit "
                          "(mesh.data=-1 is the same data parallelism)")
    setup = loop.build(config, with_data=False)
    state = loop.create_state(setup)
    run_steps = loop.compile_steps(setup)
    batch = run_steps.put_batch(synthetic_batch(config, config.seed))
    with setup.context():
        t0 = time.perf_counter()
        compiled = run_steps.train.lower(state, batch).compile()
        compile_time = time.perf_counter() - t0
    return setup, compiled, state, batch, compile_time


def run_bench(config: Config, steps: int = 10, warmup: int = 2) -> dict[str, Any]:
    setup, compiled, state, batch, compile_time = compile_train_step(config)
    with setup.context():
        for _ in range(warmup):
            state, _ = compiled(state, batch)
        jax.block_until_ready(state)
        times, cpu_times = [], []
        for _ in range(steps):
            t0, cpu0 = time.perf_counter(), time.process_time()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - cpu0)

    step_time = statistics.median(times)
    tokens_per_sec = config.train.batch_size * tokens_per_row(config) / step_time
    device = jax.devices()[0]
    peak = total_peak_flops()
    return {
        "tokens_per_sec": tokens_per_sec,
        "step_time_s": step_time,
        "compile_time_s": compile_time,
        # CPU seconds this process spent per step (all threads): on a host shared with other work, it
        # compares settings more steadily than the wall time, which also counts time spent descheduled.
        "step_cpu_time_s": statistics.median(cpu_times),
        "flops_per_token": flops_per_token(config),
        "mfu": mfu(tokens_per_sec, config, peak),
        "peak_memory_bytes": _peak_memory_bytes(compiled, device),
        "temp_memory_bytes": _temp_memory_bytes(compiled),
        "peak_flops": peak,
        "params": count_params(setup.abstract_state.params),
        "device": f"{jax.device_count()}x {getattr(device, 'device_kind', device.platform)}",
        # Whether the compiled step calls the CPU kernels (cpu_kernels.py) or XLA's own ops only.
        "cpu_kernels": "llm_jax_cpu_" in compiled.as_text(),
        "loss": float(metrics["loss"]),
    }
