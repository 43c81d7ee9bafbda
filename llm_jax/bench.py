"""`llm-jax bench`: how fast the compiled train step runs, on synthetic tokens.

FLOPs per token follow the PaLM appendix convention: 6 * N for the matmul weights (forward
and backward; N counts every weight used in a matmul, the output projection included but not
the input embedding lookup) plus 12 * n_layers * d_model * seq_len for attention scores and
values. MFU divides achieved FLOP/s by the device's peak: a table for accelerators, and on CPU a
matmul peak measured on the spot.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sharding
from llm_jax.config import Config

# Dense bf16 peak FLOP/s per chip (no sparsity), from the vendors' data sheets.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


def matmul_param_count(config: Config) -> int:
    """Weights that take part in a matmul, per token: all but the input embedding lookup."""
    m = config.model
    d, f, h = m.d_model, m.d_ff, m.head_dim
    attn = d * (m.n_heads * h) * 2 + d * (m.kv_heads * h) * 2
    mlp = d * f * (3 if m.arch == "llama" else 2)
    return m.n_layers * (attn + mlp) + d * m.vocab_size


def flops_per_token(config: Config) -> float:
    m = config.model
    return 6.0 * matmul_param_count(config) + 12.0 * m.n_layers * m.d_model * config.train.seq_len


def device_peak_flops(device: jax.Device) -> float | None:
    """The table's peak for accelerators; a measured float32 matmul peak on CPU."""
    kind = getattr(device, "device_kind", "")
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return peak
    if device.platform == "cpu":
        return measure_cpu_matmul_flops()
    return None


def measure_cpu_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-N float32 n^3 matmul throughput through XLA on this CPU."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def synthetic_batch(config: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length single-document rows of random tokens: the step costs the same as real data."""
    rng = np.random.default_rng(seed)
    b, length = config.train.batch_size // jax.process_count(), config.train.seq_len
    tokens = rng.integers(4, config.model.vocab_size, size=(b, length + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((b, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
        "weights": np.ones((b, length), np.float32),
    }


def _peak_memory_bytes(compiled, device: jax.Device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def run_bench(config: Config, steps: int = 10, warmup: int = 2) -> dict[str, Any]:
    from llm_jax import trainer

    setup = trainer.build(config, with_data=False)
    state = trainer.create_state(setup)
    train_fn, _ = trainer.compile_steps(setup)
    batch = sharding.global_batch(synthetic_batch(config, config.seed), sharding.batch_sharding(setup.mesh))

    with setup.context():
        t0 = time.perf_counter()
        compiled = train_fn.lower(state, batch).compile()
        compile_time = time.perf_counter() - t0
        for _ in range(warmup):
            state, _ = compiled(state, batch)
        jax.block_until_ready(state)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)

    step_time = statistics.median(times)
    tokens_per_sec = config.train.batch_size * config.train.seq_len / step_time
    fpt = flops_per_token(config)
    device = jax.devices()[0]
    peak = device_peak_flops(device)
    total_peak = peak * jax.device_count() if peak else None
    return {
        "tokens_per_sec": tokens_per_sec,
        "step_time_s": step_time,
        "compile_time_s": compile_time,
        "flops_per_token": fpt,
        "mfu": (tokens_per_sec * fpt / total_peak) if total_peak else None,
        "peak_memory_bytes": _peak_memory_bytes(compiled, device),
        "device": f"{jax.device_count()}x {getattr(device, 'device_kind', device.platform)}",
        "loss": float(metrics["loss"]),
    }
