"""Model FLOPs utilisation: the FLOPs a training token costs, and what the devices could do at best.

FLOPs per token follow the PaLM appendix convention: 6 * N for the matmul weights (forward and
backward; N counts every weight used in a matmul, the output projection included but not the input
embedding lookup) plus 12 * n_layers * d_model * seq_len for attention scores and values (the full
square, as the kernels compute it, though causality masks half; an encoder attends to all of it).
Norms, softmax, the optimizer and rematerialised recomputation are not counted: MFU is model FLOPs
over peak, not hardware FLOPs. An encoder-decoder's token is one of a row's encoder or decoder
positions (`tokens_per_row`): its FLOPs per token are one row's FLOPs over seq_len + target_len.

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


def _attention_weights(m) -> int:
    """q, k, v and out of one attention: d x (heads x head_dim) each, k and v with the key/value heads."""
    return m.d_model * (m.n_heads * m.resolved_head_dim) * 2 + m.d_model * (m.kv_heads * m.resolved_head_dim) * 2


def matmul_param_count(config: Config) -> int:
    """Weights that take part in a matmul, per token: all but the input embedding lookups.

    An encoder (BERT) also runs its masked-LM head's d x d transform before the vocab projection, at
    every position as the logits are computed; its pooler does not run in pretraining. An
    encoder-decoder (T5) counts both stacks (each decoder layer has a self- and a cross-attention) and
    the output projection once; which positions each weight runs at is `flops_per_token`'s business.
    """
    m = config.model
    d = m.d_model
    mlp = d * m.d_ff * m.mlp_matrices
    if m.family.encoder_decoder:
        return m.encoder_layers * (_attention_weights(m) + mlp) + m.decoder_layers * (2 * _attention_weights(m) + mlp) \
            + d * m.vocab_size
    head_transform = d * d if m.family.encoder else 0
    return m.n_layers * (_attention_weights(m) + mlp) + head_transform + d * m.vocab_size


def tokens_per_row(config: Config) -> int:
    """The tokens one row of a batch counts for: seq_len, or for an encoder-decoder its encoder and
    decoder positions together (seq_len + target_len), the unit of tokens_per_sec and flops_per_token."""
    if config.model.family.encoder_decoder:
        return config.train.seq_len + config.target_len
    return config.train.seq_len


def _encoder_decoder_row_flops(config: Config) -> float:
    """Training FLOPs (forward and backward, 6 per weight and position) of one row of an encoder-decoder.

    Encoder layers run at the S = seq_len encoder positions; decoder layers at the L = target_len decoder
    positions, except the cross-attention's key and value projections, which run over the encoder's
    output (S positions); the output projection at the decoder positions only. Attention scores and
    values, 12 x d_model per query-key pair as for the other families: S^2 (encoder), L^2 (decoder
    self-attention) and L x S (cross-attention) pairs per layer.
    """
    m = config.model
    d, kv = m.d_model, m.d_model * m.kv_heads * m.resolved_head_dim
    hd = m.n_heads * m.resolved_head_dim  # the width attention scores and values run over
    enc_len, dec_len = config.train.seq_len, config.target_len
    mlp = d * m.d_ff * m.mlp_matrices
    encoder = m.encoder_layers * (enc_len * (_attention_weights(m) + mlp) + 2 * hd * enc_len * enc_len)
    cross_kv = 2 * kv
    decoder = m.decoder_layers * (dec_len * (2 * _attention_weights(m) - cross_kv + mlp) + enc_len * cross_kv
                                  + 2 * hd * (dec_len * dec_len + dec_len * enc_len))
    return 6.0 * (encoder + decoder + dec_len * d * m.vocab_size)


def flops_per_token(config: Config) -> float:
    """Training FLOPs per token; for an encoder-decoder, one row's FLOPs over its tokens_per_row."""
    m = config.model
    if m.family.encoder_decoder:
        return _encoder_decoder_row_flops(config) / tokens_per_row(config)
    # Scores and values run over heads x head_dim, which is d_model unless model.head_dim says otherwise.
    return 6.0 * matmul_param_count(config) + 12.0 * m.n_layers * m.n_heads * m.resolved_head_dim * config.train.seq_len


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
