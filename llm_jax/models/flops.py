"""Model FLOPs utilisation: the FLOPs a training token costs, and what the devices could do at best.

FLOPs per token follow the PaLM appendix convention: 6 * N for the matmul weights (forward and
backward; N counts every weight used in a matmul, the output projection included but not the input
embedding lookup) plus 12 * n_layers * d_model * seq_len for attention scores and values (the full
square, as the kernels compute it, though causality masks half; an encoder attends to all of it).
An encoder-decoder's row holds seq_len inputs and target_len targets (`tokens_per_row`): its FLOPs
per token are those of a whole row (the encoder on the inputs; the decoder, its cross-attention
and the output projection on the targets, the cross-attention's keys and values on the encoder's
outputs) over that row's tokens. Norms, softmax, the optimizer and rematerialised recomputation are
not counted: MFU is model FLOPs over peak, not hardware FLOPs.

The peak is a table of dense bf16 figures for accelerators. A CPU has no such figure that XLA
reaches, so its peak is a float32 matmul measured through XLA on the spot, once per process.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

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
    """Weights that take part in a matmul, per token: all but the input embedding lookups.

    An encoder (BERT) also runs its masked-LM head's d x d transform before the vocab projection, at
    every position as the logits are computed; its pooler does not run in pretraining.
    """
    m = config.model
    d, f, h = m.d_model, m.d_ff, m.head_dim
    attn = d * (m.n_heads * h) * 2 + d * (m.kv_heads * h) * 2
    mlp = d * f * m.mlp_matrices
    head_transform = d * d if m.family.encoder else 0
    return m.n_layers * (attn + mlp) + head_transform + d * m.vocab_size


def tokens_per_row(config: Config) -> int:
    """Tokens one batch row carries through the model: an encoder-decoder's inputs and targets
    (seq_len + target_len), else seq_len. Throughput, MFU and tokens seen count these."""
    if config.model.family.encoder_decoder:
        return config.train.seq_len + config.target_len
    return config.train.seq_len


def flops_per_token(config: Config) -> float:
    m = config.model
    if m.family.encoder_decoder:
        return _encoder_decoder_row_flops(config) / tokens_per_row(config)
    return 6.0 * matmul_param_count(config) + 12.0 * m.n_layers * m.d_model * config.train.seq_len


def _encoder_decoder_row_flops(config: Config) -> float:
    """The model FLOPs of one row of an encoder-decoder (training: forward and backward)."""
    m = config.model
    d, inputs, targets = m.d_model, config.train.seq_len, config.target_len
    query_out = d * m.n_heads * m.head_dim * 2
    key_value = d * m.kv_heads * m.head_dim * 2
    mlp = d * m.d_ff * m.mlp_matrices
    encoder = inputs * (6.0 * m.encoder_layers * (query_out + key_value + mlp) + 12.0 * m.encoder_layers * d * inputs)
    # Per target: self-attention (all four projections), the cross-attention's queries and outputs, the
    # MLP and the output projection; attention over the targets and over the inputs.
    decoder = targets * (6.0 * (m.decoder_layers * (2 * query_out + key_value + mlp) + d * m.vocab_size)
                         + 12.0 * m.decoder_layers * d * (targets + inputs))
    cross_key_value = inputs * 6.0 * m.decoder_layers * key_value  # projected from each encoder output
    return encoder + decoder + cross_key_value


@functools.cache
def measure_cpu_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    """Best-of-N float32 n^3 matmul throughput through XLA on this host's CPU (all its cores).

    n = 1024 reaches the same rate as 2048 on a 2-core Xeon in a tenth of the time (~0.1 s), so
    the training loop can afford it at start-up; cached, so a process measures once.
    """
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def device_peak_flops(device: jax.Device) -> float | None:
    """The table's peak for an accelerator, a measured matmul peak for a CPU, else None."""
    kind = getattr(device, "device_kind", "")
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return peak
    if device.platform == "cpu":
        return measure_cpu_matmul_flops()
    return None


def total_peak_flops() -> float | None:
    """Peak FLOP/s of all devices of the run. Fake CPU devices of one process share the host's cores,
    so on CPU the measured peak counts once per process, not once per device."""
    device = jax.devices()[0]
    peak = device_peak_flops(device)
    if peak is None:
        return None
    return peak * (jax.process_count() if device.platform == "cpu" else jax.device_count())


def mfu(tokens_per_sec: float, config: Config, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation of a global token rate; None when the peak is unknown."""
    if not peak_flops:
        return None
    return tokens_per_sec * flops_per_token(config) / peak_flops
