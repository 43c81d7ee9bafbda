"""Building blocks of the networks: projections, norms, positions, attention (causal or both ways), MLP, blocks.

Conventions:
- Shapes are written as suffixes: `x_BLE` is [batch, length, embed]. Letters: B batch, L query
  length, S key length, E embed (d_model), V vocab, H query heads, K key/value heads, G query heads
  per key/value head (H = K * G), D head_dim, F mlp hidden (d_ff), P position-table length.
- Every parameter is created through `nn.with_logical_partitioning`, so `init` returns
  `nn.Partitioned` boxes and sharding is a matter of `mesh.axis_rules` in the config. Main
  activations carry `nn.with_logical_constraint`, a no-op outside a mesh and rules context.
- Matmuls run in the compute `dtype`; parameters are stored in `param_dtype`; norms, softmax and the
  logits run in float32, because those are where bfloat16 loses the accuracy that matters.
"""

from __future__ import annotations

import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from jax.ad_checkpoint import checkpoint_name

from llm_jax.config import ModelConfig
from llm_jax.kernels import blocked_attention, cpu_kernels, splash_attention

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Large enough to zero a softmax entry, small enough not to overflow float32 when subtracted.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def to_dtype(name: str) -> jnp.dtype:
    """Config strings ('bfloat16') to jnp dtypes; the config stays plain YAML."""
    return jnp.dtype(DTYPES[name])


def output_init_std(config: ModelConfig) -> float:
    """GPT-2 scaled init: each block adds two projections to the residual stream, so their
    std shrinks with depth to keep the stream's variance roughly constant at init."""
    return config.init_std / math.sqrt(2 * config.n_layers)


def constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, axes)


# ----------------------------------------------------------------------------- projections


def traced_platform() -> str:
    """The platform of the computation being traced now: its mesh's (which may be an AOT target,
    e.g. a TPU topology planned from a CPU host), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def use_cpu_kernels(dtype: jnp.dtype) -> bool:
    """Whether the attention and matmuls being traced now should be the fused CPU kernels
    (cpu_kernels.py): float32 on a CPU, one device (a custom call is not split by XLA's
    partitioner; pmap runs one program per device), and the kernels built."""
    mesh = jax.sharding.get_abstract_mesh()
    one_device = mesh.empty or mesh.size == 1
    return traced_platform() == "cpu" and one_device and dtype == jnp.float32 and cpu_kernels.available()


def use_cpu_matmul(dtype: jnp.dtype, out_dtype: jnp.dtype | None = None) -> bool:
    """Whether a projection should be the CPU matmul kernel: as `use_cpu_kernels`, float32 in and out."""
    return (out_dtype or dtype) == jnp.float32 and use_cpu_kernels(dtype)


def dequantized(weight: jax.Array | qwix.QArray) -> jax.Array:
    """A weight as an array. An int8 weight (a qwix QArray: int8 values and float32 scales, written by
    `llm-jax quantize`, infer/quantize.py) is dequantized here, at its use inside the compiled call,
    so between calls memory holds the int8 values, not float copies; other weights pass unchanged."""
    if isinstance(weight, qwix.QArray):
        return qwix.dequantize(weight)
    return weight


class Dense(nn.Module):
    """x[..., in dims] @ kernel[in dims, out dims] (+ bias[out dims]), with logical axes.

    One module for every projection, so multi-dimensional kernels (embed -> heads x head_dim)
    keep their head axes as real axes that can be sharded, instead of being flattened.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]  # names of the contracted input dims, then of `features`
    n_in: int = 1  # trailing dims of x that are contracted
    use_bias: bool = False
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    out_dtype: jnp.dtype | None = None  # None: `dtype`; float32 for the logits

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.n_in:]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.kernel_axes),
            (*in_shape, *self.features),
            self.param_dtype,
        )
        kernel = dequantized(kernel)
        # Leading (batch, length) dims are merged into one before the matmul: XLA:CPU runs the 2-D
        # matmul and its gradients about 6% faster per baby-GPT step than the 3-D one (docs/benchmarks.md).
        lead_shape = x.shape[:x.ndim - self.n_in]
        if use_cpu_matmul(self.dtype, self.out_dtype):
            # OpenBLAS through XLA FFI (cpu_kernels.py): XLA:CPU's own matmuls are slower here.
            y = cpu_kernels.matmul(x.reshape(math.prod(lead_shape), math.prod(in_shape)),
                                   kernel.reshape(math.prod(in_shape), math.prod(self.features)))
            y = checkpoint_name(y, cpu_kernels.MATMUL_NAME).reshape(*lead_shape, *self.features)
        else:
            x_flat = x.reshape(math.prod(lead_shape), *in_shape)
            y = jax.lax.dot_general(
                x_flat.astype(self.dtype),
                kernel.astype(self.dtype),
                ((tuple(range(1, 1 + self.n_in)), tuple(range(self.n_in))), ((), ())),
                preferred_element_type=self.out_dtype or self.dtype,
            ).reshape(*lead_shape, *self.features)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[self.n_in:]),
                self.features,
                self.param_dtype,
            )
            y = y + bias.astype(y.dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
        return y


class Embed(nn.Module):
    """A lookup table; `attend` reuses it as the output projection when embeddings are tied."""

    num_embeddings: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids_BL: jax.Array) -> jax.Array:
        # Gather the embed axis first (what FSDP does for every weight): XLA cannot partition a
        # lookup from a table sharded on embed into batch-sharded activations, and would
        # otherwise replicate the whole table and the lookup's gradient.
        if isinstance(self.embedding, qwix.QArray):  # int8 rows and their scales: only the rows read are dequantized
            rows = qwix.QArray(qvalue=jnp.take(self.embedding.qvalue, ids_BL, axis=0),
                               scale=jnp.take(self.embedding.scale, ids_BL, axis=0), qtype=self.embedding.qtype)
            return dequantized(rows).astype(self.dtype)
        table_VE = constrain(self.embedding, (self.axes[0], None))
        return jnp.take(table_VE, ids_BL, axis=0).astype(self.dtype)  # [B, L, E]

    def attend(self, x_BLE: jax.Array) -> jax.Array:
        """Logits against the table, accumulated and returned in float32 (tokens flattened, as in Dense)."""
        batch, length, features = x_BLE.shape
        table_VE = dequantized(self.embedding)
        if use_cpu_matmul(self.dtype):
            logits_TV = cpu_kernels.matmul(x_BLE.reshape(batch * length, features), table_VE, transpose_b=True)
            return checkpoint_name(logits_TV, cpu_kernels.MATMUL_NAME).reshape(batch, length, self.num_embeddings)
        logits_TV = jnp.einsum(
            "te,ve->tv",
            x_BLE.reshape(batch * length, features).astype(self.dtype),
            table_VE.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return logits_TV.reshape(batch, length, self.num_embeddings)


# ----------------------------------------------------------------------------- norms


class Norm(nn.Module):
    """LayerNorm (gpt2: centred, with a bias) or RMSNorm (llama: neither). Statistics in float32
    whatever the compute dtype."""

    rms: bool = False
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]

        def vector(name, init):  # [E] in float32
            param = self.param(name, nn.with_logical_partitioning(init, ("embed",)), (features,), self.param_dtype)
            return param.astype(jnp.float32)

        scale = vector("scale", nn.initializers.ones)
        bias = None if self.rms else vector("bias", nn.initializers.zeros)
        if use_cpu_kernels(self.dtype):
            # One pass per row (cpu_kernels.py): inside a whole step XLA:CPU splits a norm into many.
            return cpu_kernels.layer_norm(x, scale, bias, self.eps).astype(self.dtype)
        broadcast = (1,) * (x.ndim - 1) + (features,)
        x32 = x.astype(jnp.float32)
        if not self.rms:
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        y = y * scale.reshape(broadcast)
        if not self.rms:
            y = y + bias.reshape(broadcast)
        return y.astype(self.dtype)


def make_norm(config: ModelConfig, name: str) -> nn.Module:
    return Norm(rms=config.family.norm == "rms", eps=config.resolved_norm_eps, dtype=to_dtype(config.dtype),
                param_dtype=to_dtype(config.param_dtype), name=name)


# ----------------------------------------------------------------------------- positions


def sinusoidal_positions(positions_BL: jax.Array, features: int) -> jax.Array:
    """The fixed sin/cos table of "Attention is all you need", computed for any position, so
    it needs no max_len and restarts cleanly inside packed rows. Returns float32 [B, L, E]."""
    half = (features + 1) // 2
    inv_freq_F = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles_BLF = positions_BL.astype(jnp.float32)[:, :, None] * inv_freq_F[None, None, :]
    table_BLE = jnp.concatenate([jnp.sin(angles_BLF), jnp.cos(angles_BLF)], axis=-1)
    return table_BLE[:, :, :features]


def apply_rope(x_BLHD: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, "rotate half" layout: dim i pairs with dim i + D/2.

    Rotating q and k by angles proportional to their positions makes q.k depend only on the
    position difference, which is what lets packed documents restart at position 0.
    Computed in float32, returned in x's dtype.
    """
    head_dim = x_BLHD.shape[-1]
    half = head_dim // 2
    inv_freq_F = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))  # F = D / 2
    angles_BLF = positions_BL.astype(jnp.float32)[:, :, None] * inv_freq_F[None, None, :]
    sin_BL1F = jnp.sin(angles_BLF)[:, :, None, :]
    cos_BL1F = jnp.cos(angles_BLF)[:, :, None, :]
    x32 = x_BLHD.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([x1 * cos_BL1F - x2 * sin_BL1F, x2 * cos_BL1F + x1 * sin_BL1F], axis=-1)
    return rotated.astype(x_BLHD.dtype)


# ----------------------------------------------------------------------------- attention


def causal_segment_mask(segment_ids_BL: jax.Array | None, length: int) -> jax.Array:
    """Bool [B or 1, 1, L, L]: query i sees key j iff j <= i and both lie in the same document.

    Causality is by index in the row, not by position id, because positions restart at 0 for
    each packed document. Padding (segment 0) only sees padding, so no row is fully masked.
    """
    index_L = jnp.arange(length)
    mask_11LL = (index_L[:, None] >= index_L[None, :])[None, None, :, :]
    if segment_ids_BL is None:
        return mask_11LL
    same_B1LL = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
    return jnp.logical_and(mask_11LL, same_B1LL)


def segment_mask(segment_ids_BL: jax.Array | None, length: int) -> jax.Array:
    """Bool [B or 1, 1, L, L]: query i sees key j iff both lie in the same document, in either
    direction (an encoder's attention). Padding (segment 0) only sees padding, so no row is fully
    masked; segment_ids None: the whole row is one document."""
    if segment_ids_BL is None:
        return jnp.ones((1, 1, length, length), bool)
    return segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]


def xla_attention(q_BLHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask_B1LS: jax.Array) -> jax.Array:
    """Explicit grouped-query attention: each group of G query heads shares one key/value head
    without materialising repeated keys. Scores and softmax in float32."""
    batch, length, n_heads, head_dim = q_BLHD.shape
    n_kv = k_BSKD.shape[2]
    q_BLKGD = q_BLHD.reshape(batch, length, n_kv, n_heads // n_kv, head_dim)
    scores_BKGLS = jnp.einsum("blkgd,bskd->bkgls", q_BLKGD, k_BSKD, preferred_element_type=jnp.float32)
    scores_BKGLS = scores_BKGLS * (1.0 / math.sqrt(head_dim))
    scores_BKGLS = jnp.where(mask_B1LS[:, :, None, :, :], scores_BKGLS, _MASK_VALUE)
    probs_BKGLS = jax.nn.softmax(scores_BKGLS, axis=-1).astype(v_BSKD.dtype)
    out_BLKGD = jnp.einsum("bkgls,bskd->blkgd", probs_BKGLS, v_BSKD)
    return out_BLKGD.reshape(batch, length, n_heads, head_dim)


def bidirectional_attention(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array,
                            segment_ids_BL: jax.Array | None) -> jax.Array:
    """An encoder's attention on the explicit path (`model.attention=xla`): every key of the query's
    document, before or after it. The same function as `xla_attention` with `segment_mask`, computed
    block by block with a FlashAttention backward (blocked_attention.py)."""
    return blocked_attention.bidirectional_attention(q_BLHD, k_BLKD, v_BLKD,
                                                     segment_mask(segment_ids_BL, q_BLHD.shape[1]))


def segment_runs(segment_ids_BL: jax.Array, max_runs: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Packed rows in cuDNN's ragged ("THD") description: (offsets [B, R+1], lengths [B, R]) int32.

    Each run of equal segment ids is one sequence: its start in the row and its length, runs in
    order, then -1 padding (the layout `q_offsets`/`q_seqlen` of jax's cuDNN attention take).
    R = max_runs, the most runs a row may hold (None: L, one per position); a row with more runs
    than R would lose the rest, so the packer is bound to R - 1 documents (one run is left for the
    trailing padding). R matters: cuDNN's backward pass takes temporary memory in proportion to
    B x R x L (ModelConfig.max_documents_per_row). Trailing padding (segment 0) is a run of its own,
    so it attends only to itself, as in `causal_segment_mask` and `segment_mask`.
    The packer gives each document of a row its own id, so runs and documents are the same.
    """
    batch, length = segment_ids_BL.shape
    starts_BL = jnp.concatenate([jnp.ones((batch, 1), bool), segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
    # Run starts in order, then `length` for every row position that starts no run.
    start_BL = jnp.sort(jnp.where(starts_BL, jnp.arange(length, dtype=jnp.int32), length), axis=-1)
    end_BL = jnp.concatenate([start_BL[:, 1:], jnp.full((batch, 1), length, jnp.int32)], axis=1)
    is_run_BL = start_BL < length
    lengths_BL = jnp.where(is_run_BL, end_BL - start_BL, -1).astype(jnp.int32)
    offsets_BL1 = jnp.concatenate([jnp.where(is_run_BL, start_BL, -1), jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    runs = length if max_runs is None else min(max_runs, length)
    offsets_BR1 = jnp.concatenate([offsets_BL1[:, :runs], offsets_BL1[:, -1:]], axis=1)
    return offsets_BR1.astype(jnp.int32), lengths_BL[:, :runs]


def fused_attention(q_BLHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array,
                    segment_ids_BL: jax.Array | None, platform: str | None = None, causal: bool = True,
                    max_runs: int | None = None) -> jax.Array:
    """`model.attention=cudnn`: cuDNN's fused flash attention on GPU for 16-bit dtypes (the only
    ones it supports), JAX's XLA attention elsewhere (`jax.nn.dot_product_attention`).

    On GPU, packed documents go in as cuDNN's own ragged sequences (`segment_runs`): the kernel
    masks within each document (and causally, for a decoder), and no [B, 1, L, L] mask or bias is
    ever built (a mask would be quadratic in memory: as a bfloat16 bias 256 MiB at batch 32 x 2048).
    Without segment ids causality is `is_causal`, so cuDNN skips the masked half. causal=False (an
    encoder): the same within documents, in both directions. max_runs: the most runs of equal
    segment ids in a row (`segment_runs`), documents and trailing padding.
    """
    platform = platform or traced_platform()
    if platform == "tpu":
        _warn_once("model.attention=cudnn on TPU is JAX's XLA attention with a dense document mask; "
                   "use model.attention=splash there")
    if platform != "gpu" or q_BLHD.dtype not in (jnp.bfloat16, jnp.float16):
        return _masked_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, None, causal)
    if segment_ids_BL is None:
        return jax.nn.dot_product_attention(q_BLHD, k_BSKD, v_BSKD, is_causal=causal, implementation="cudnn")
    try:
        return _cudnn_packed_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, causal, max_runs)
    except NotImplementedError as e:  # e.g. the packed layout needs a Hopper GPU (H100/H200) or newer
        _warn_once(f"cuDNN cannot take packed documents here ({e}); building a [B, 1, L, L] mask instead")
        return _masked_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, "cudnn", causal)


def _masked_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, implementation, causal):
    mask_B1LL = None if segment_ids_BL is None else segment_mask(segment_ids_BL, q_BLHD.shape[1])
    return jax.nn.dot_product_attention(q_BLHD, k_BSKD, v_BSKD, mask=mask_B1LL, is_causal=causal,
                                        implementation=implementation)


def _cudnn_packed_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, causal, max_runs):
    # jax.nn.dot_product_attention takes only per-row lengths, not several sequences per row; its
    # cuDNN module (jax 0.10) takes them as offsets and lengths per row ("packed" layout, Hopper+).
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    n_heads, n_kv = q_BLHD.shape[2], k_BSKD.shape[2]
    if n_kv != n_heads:
        # The packed layout strides key offsets by the *query* heads (jax 0.10's
        # _fix_seqlen_offsets), so grouped-query keys and values are repeated to match: linear
        # memory, B x L x H x D, against the quadratic mask this path avoids.
        k_BSKD = jnp.repeat(k_BSKD, n_heads // n_kv, axis=2)
        v_BSKD = jnp.repeat(v_BSKD, n_heads // n_kv, axis=2)
    offsets_BR1, lengths_BR = segment_runs(segment_ids_BL, max_runs)
    return cudnn.dot_product_attention(
        q_BLHD, k_BSKD, v_BSKD, q_seqlen=lengths_BR, kv_seqlen=lengths_BR, q_offsets=offsets_BR1,
        kv_offsets=offsets_BR1, scale=1.0 / math.sqrt(q_BLHD.shape[-1]),
        mask_type=cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING, qkv_layout="BTNH")


def splash_attention_on(platform: str, q_BLHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array,
                        segment_ids_BL: jax.Array | None, causal: bool = True) -> jax.Array:
    """Pallas splash attention (splash_attention.py): compiled for a TPU; elsewhere the same kernel
    runs in the Pallas interpreter, to check numerics on a laptop, not for speed."""
    if platform != "tpu":
        _warn_once(f"model.attention=splash runs in the Pallas interpreter on {platform}: correct but slow; "
                   "use model.attention=xla or cudnn off TPU")
    return splash_attention.attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, causal=causal,
                                      interpret=platform != "tpu")


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger(__name__).warning(message)


class Attention(nn.Module):
    """Grouped-query self-attention: causal with an optional KV cache (a decoder), or bidirectional
    within each document (an encoder family, `config.family.encoder`; no decode mode).

    Decoding follows the Flax convention: `init(..., decode=True)` with the full length creates
    zeroed "cache" variables; each later `apply(..., decode=True, mutable=["cache"])` writes its
    keys/values at the cache index and attends to everything written so far. A decode call may
    carry several tokens (a prompt prefill) or one. In decode mode a row holds a single document and
    segment ids only mark padding: slots written with segment id 0 (the left padding of a batch of
    prompts of different lengths, infer/generate.py) are never attended to; None marks every slot
    real. The einsum attention is used whatever
    `config.attention` says: a cached step is bound by reading the cache, not by the kernel.

    Dropout is applied to the block's residual branches, not to attention probabilities, so
    both attention implementations compute the same function.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLE: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array | None,
                 decode: bool) -> jax.Array:
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        use_bias = cfg.family.bias
        causal = not cfg.family.encoder
        if decode and not causal:
            raise ValueError(f"model.arch={cfg.arch} is an encoder: it has no decode mode (KV cache)")

        def proj(name, n_heads, heads_axis):
            return Dense(features=(n_heads, cfg.resolved_head_dim), kernel_axes=("embed", heads_axis, "head_dim"),
                         use_bias=use_bias, init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype,
                         name=name)

        q_BLHD = proj("query", cfg.n_heads, "heads")(x_BLE)
        k_BLKD = proj("key", cfg.kv_heads, "kv_heads")(x_BLE)
        v_BLKD = proj("value", cfg.kv_heads, "kv_heads")(x_BLE)
        if cfg.resolved_position == "rope":
            q_BLHD = apply_rope(q_BLHD, positions_BL, cfg.rope_theta)
            k_BLKD = apply_rope(k_BLKD, positions_BL, cfg.rope_theta)
        q_BLHD = constrain(q_BLHD, ("batch", "length", "heads", "head_dim"))
        k_BLKD = constrain(k_BLKD, ("batch", "length", "kv_heads", "head_dim"))
        v_BLKD = constrain(v_BLKD, ("batch", "length", "kv_heads", "head_dim"))

        if decode and self.has_variable("cache", "cached_key"):
            out_BLHD = self._cached_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
        else:
            if decode:  # the init call: create the cache, sized by this full-length input
                self._cache_variables(k_BLKD.shape, k_BLKD.dtype)
            if cfg.attention == "cudnn":
                documents = cfg.resolved_max_documents_per_row  # + 1: the run of trailing padding
                out_BLHD = fused_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal=causal,
                                           max_runs=None if documents is None else documents + 1)
            elif cfg.attention == "splash" and not decode:  # the cache's init call may be any length
                out_BLHD = splash_attention_on(traced_platform(), q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal)
            elif use_cpu_kernels(q_BLHD.dtype):  # fused C++ kernels (cpu_kernels.py), the same functions
                fused = cpu_kernels.causal_attention if causal else cpu_kernels.bidirectional_attention
                out_BLHD = fused(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
            elif not causal:  # an encoder's explicit path
                out_BLHD = bidirectional_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
            else:  # the same function as xla_attention, computed block by block (blocked_attention.py)
                mask_B1LL = causal_segment_mask(segment_ids_BL, x_BLE.shape[1])
                out_BLHD = blocked_attention.causal_attention(q_BLHD, k_BLKD, v_BLKD, mask_B1LL)
        out_BLHD = constrain(out_BLHD, ("batch", "length", "heads", "head_dim"))

        return Dense(features=(cfg.d_model,), kernel_axes=("heads", "head_dim", "embed"), n_in=2,
                     use_bias=use_bias, init_std=output_init_std(cfg), dtype=dtype,
                     param_dtype=param_dtype, name="out")(out_BLHD)

    def _cache_variables(self, shape_BSKD: tuple[int, ...], dtype: jnp.dtype):
        """The cache: keys and values [B, S, K, D], which slots hold a real token (not padding) [B, S]
        and the next slot to write (zeros at creation)."""
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape_BSKD, dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape_BSKD, dtype)
        cached_real = self.variable("cache", "cached_real", jnp.zeros, shape_BSKD[:2], jnp.bool_)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        return cached_key, cached_value, cached_real, cache_index

    def _cached_attention(self, q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array,
                          segment_ids_BL: jax.Array | None) -> jax.Array:
        """Writes this call's keys/values at the cache index, advances it, and attends to every real
        slot written so far (unwritten slots lie in the causal future, so the mask hides them).

        A query that sees no real slot (a padding query of the prefill) attends uniformly: its
        output is finite and never read, as no later query attends to its slot."""
        cached_key, cached_value, cached_real, cache_index = self._cache_variables(k_BLKD.shape, k_BLKD.dtype)
        index = cache_index.value
        k_BSKD = jax.lax.dynamic_update_slice(cached_key.value, k_BLKD.astype(cached_key.value.dtype),
                                              (0, index, 0, 0))
        v_BSKD = jax.lax.dynamic_update_slice(cached_value.value, v_BLKD.astype(cached_value.value.dtype),
                                              (0, index, 0, 0))
        batch, length, max_length = k_BLKD.shape[0], k_BLKD.shape[1], k_BSKD.shape[1]
        real_BL = jnp.ones((batch, length), bool) if segment_ids_BL is None else segment_ids_BL != 0
        real_BS = jax.lax.dynamic_update_slice(cached_real.value, real_BL, (0, index))
        cached_key.value, cached_value.value, cached_real.value = k_BSKD, v_BSKD, real_BS
        cache_index.value = index + length
        query_index_L = index + jnp.arange(length)
        causal_11LS = (jnp.arange(max_length)[None, :] <= query_index_L[:, None])[None, None, :, :]
        mask_B1LS = jnp.logical_and(causal_11LS, real_BS[:, None, None, :])
        return xla_attention(q_BLHD, k_BSKD, v_BSKD, mask_B1LS)


# ----------------------------------------------------------------------------- MLP and block


# The MLP activations a family (models/families.py) or model.activation may name.
ACTIVATIONS = {"gelu_tanh": functools.partial(nn.gelu, approximate=True),
               "gelu": functools.partial(nn.gelu, approximate=False), "silu": nn.silu, "relu": nn.relu}


class Mlp(nn.Module):
    """Plain: fc, activation, proj (gpt2: GELU). Gated: activation(gate) * up, then proj (llama: SwiGLU)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLE: jax.Array) -> jax.Array:
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        use_bias = cfg.family.bias

        def dense(name, features, axes, std):
            return Dense(features=(features,), kernel_axes=axes, use_bias=use_bias, init_std=std,
                         dtype=dtype, param_dtype=param_dtype, name=name)

        activation = ACTIVATIONS[cfg.resolved_activation]
        if cfg.resolved_gated_mlp:
            gate_BLF = dense("gate", cfg.d_ff, ("embed", "mlp"), cfg.init_std)(x_BLE)
            up_BLF = dense("up", cfg.d_ff, ("embed", "mlp"), cfg.init_std)(x_BLE)
            h_BLF = activation(gate_BLF) * up_BLF
        else:
            h_BLF = activation(dense("fc", cfg.d_ff, ("embed", "mlp"), cfg.init_std)(x_BLE))
        h_BLF = constrain(h_BLF, ("batch", "length", "mlp"))
        return dense("proj", cfg.d_model, ("mlp", "embed"), output_init_std(cfg))(h_BLF)


class DecoderBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    Returns (x, None), the (carry, per-layer output) pair of an `nn.scan` body, so the same module
    serves the scanned and the unrolled stacks. Arguments are positional so that `nn.remat` can
    mark `deterministic` and `decode` static.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLE: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array | None,
                 deterministic: bool, decode: bool):
        cfg = self.config
        h_BLE = make_norm(cfg, "attn_norm")(x_BLE)
        h_BLE = Attention(cfg, name="attn")(h_BLE, positions_BL, segment_ids_BL, decode)
        x_BLE = x_BLE + nn.Dropout(cfg.dropout)(h_BLE, deterministic=deterministic)
        h_BLE = make_norm(cfg, "mlp_norm")(x_BLE)
        h_BLE = Mlp(cfg, name="mlp")(h_BLE)
        x_BLE = x_BLE + nn.Dropout(cfg.dropout)(h_BLE, deterministic=deterministic)
        return constrain(x_BLE, ("batch", "length", "embed")), None
