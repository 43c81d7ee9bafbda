"""The T5 encoder-decoder: shared embedding -> bidirectional encoder stack -> causal decoder stack that
also attends to the encoder's output -> logits over the target positions.

T5 v1.1 conventions (model.arch=t5): pre-norm blocks x + f(norm(x)) with RMSNorm (no bias, no centring,
float32 statistics: Hugging Face's T5LayerNorm), no biases anywhere, bucketed relative position biases
(relative.py) instead of position embeddings, attention without 1/sqrt(d) scaling, gated-GELU MLP,
untied output. The original T5 is the same family with model.activation=relu model.gated_mlp=false
model.tie_embeddings=true: a plain fc/proj MLP and the embedding as output projection, fed
x * d_model**-0.5 (family.scale_tied_logits). Shape suffixes as in `layers.py` (S encoder length,
L decoder length, N relative position buckets, F d_ff).

Parameters are laid out one for one as Hugging Face's `T5ForConditionalGeneration` lays them out, so
importing or exporting one is a mapping of names and axes, never a change of the network. Parameter
tree (unrolled; with `scan_layers` each stack's blocks are one subtree "layers" whose leaves have a
leading [n_layers] axis named "layers", as in decoder.py), and the Hugging Face names (i: block):
    embed/embedding [V, E]                          shared.weight (= encoder/decoder.embed_tokens)
    encoder/relative_position/bias [N, H]           encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    encoder/layer_{i}/attn_norm/scale [E]           encoder.block.{i}.layer.0.layer_norm.weight
    encoder/layer_{i}/attn/{query,key,value}/kernel [E, H, D]
                                                    encoder.block.{i}.layer.0.SelfAttention.{q,k,v}.weight
    encoder/layer_{i}/attn/out/kernel [H, D, E]     encoder.block.{i}.layer.0.SelfAttention.o.weight
    encoder/layer_{i}/mlp_norm/scale [E]            encoder.block.{i}.layer.1.layer_norm.weight
    encoder/layer_{i}/mlp/{gate,up}/kernel [E, F]   encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1}.weight (gated)
    encoder/layer_{i}/mlp/fc/kernel [E, F]          encoder.block.{i}.layer.1.DenseReluDense.wi.weight (original T5)
    encoder/layer_{i}/mlp/proj/kernel [F, E]        encoder.block.{i}.layer.1.DenseReluDense.wo.weight
    encoder/final_norm/scale [E]                    encoder.final_layer_norm.weight
    decoder/relative_position/bias [N, H]           decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    decoder/layer_{i}/self_attn_norm/scale          decoder.block.{i}.layer.0.layer_norm.weight
    decoder/layer_{i}/self_attn/{query,key,value,out}
                                                    decoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight
    decoder/layer_{i}/cross_attn_norm/scale         decoder.block.{i}.layer.1.layer_norm.weight
    decoder/layer_{i}/cross_attn/{query,key,value,out}
                                                    decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}.weight
    decoder/layer_{i}/mlp_norm/scale                decoder.block.{i}.layer.2.layer_norm.weight
    decoder/layer_{i}/mlp/{gate,up,proj | fc,proj}  decoder.block.{i}.layer.2.DenseReluDense.{wi_0,wi_1,wo | wi,wo}
    decoder/final_norm/scale [E]                    decoder.final_layer_norm.weight
    lm_head/kernel [E, V]                           lm_head.weight (untied only; tied: shared.weight)
Hugging Face kernels are [out, in] (torch Linear): q/k/v.weight [H*D, E] is kernel.reshape(E, H*D).T;
o.weight [E, H*D] is kernel.reshape(H*D, E).T; wi*/wo/lm_head.weight are kernel.T. The embedding and
relative bias tables are not transposed (torch Embedding is [rows, features]). Norm scales are
layer_norm.weight. Hugging Face's config: d_model=E, d_kv=D (model.head_dim; None: d_model / n_heads, so a
checkpoint with n_heads x d_kv != d_model, as t5-v1_1-small's 6 x 64 < 512, sets it), num_heads=H,
d_ff=F, num_layers / num_decoder_layers, relative_attention_num_buckets=N (model.relative_buckets: the table's rows; the
encoder gives half to each direction),
relative_attention_max_distance, layer_norm_epsilon=model.norm_eps, feed_forward_proj "gated-gelu"
(gelu_tanh, gated) or "relu", tie_word_embeddings, decoder_start_token_id=0 (the pad id, data/). The
mapping in code, both ways (`llm-jax hf import` / `hf export`): llm_jax/hf/t5.py.

Init is T5's (Hugging Face's _init_weights, factor 1), fixed by the fan-ins: model.init_std does not
apply. One exception: the untied lm_head is drawn with std d_model**-0.5 (fan-in, as T5X does), not 1.0
as Hugging Face does, which would start the logits at std ~sqrt(d_model).

Differences of function, in training only (dropout): dropout acts after the embeddings, on the residual
branches and after each stack's final norm, as in Hugging Face, but not also on attention probabilities
or inside the MLP (the other families' convention, layers.Attention).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.models.decoder import layer_stack, remat_block
from llm_jax.models.layers import (
    ACTIVATIONS,
    Dense,
    Embed,
    causal_segment_mask,
    constrain,
    make_norm,
    segment_mask,
    to_dtype,
)
from llm_jax.models.relative import CrossAttention, RelativePositionBias, SelfAttention, mask_to_bias

# Positional indices (self = 0) of the blocks' Python-valued arguments, for nn.remat.
_STATIC_ENCODER_ARGS = (3,)  # deterministic
_STATIC_DECODER_ARGS = (6, 7)  # deterministic, decode


class Mlp(nn.Module):
    """T5's feed-forward: activation(gate) * up, then proj (v1.1); or activation(fc), then proj.

    `layers.Mlp`'s function and parameter names, with T5's init: fan-in std d_model**-0.5 into the
    hidden layer, d_ff**-0.5 out of it (layers.Mlp scales by init_std and depth instead).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLE: jax.Array) -> jax.Array:
        cfg = self.config

        def dense(name, features, axes, std):
            return Dense(features=(features,), kernel_axes=axes, init_std=std, dtype=to_dtype(cfg.dtype),
                         param_dtype=to_dtype(cfg.param_dtype), name=name)

        activation = ACTIVATIONS[cfg.resolved_activation]
        if cfg.resolved_gated_mlp:
            gate_BLF = dense("gate", cfg.d_ff, ("embed", "mlp"), cfg.d_model**-0.5)(x_BLE)
            up_BLF = dense("up", cfg.d_ff, ("embed", "mlp"), cfg.d_model**-0.5)(x_BLE)
            h_BLF = activation(gate_BLF) * up_BLF
        else:
            h_BLF = activation(dense("fc", cfg.d_ff, ("embed", "mlp"), cfg.d_model**-0.5)(x_BLE))
        h_BLF = constrain(h_BLF, ("batch", "length", "mlp"))
        return dense("proj", cfg.d_model, ("mlp", "embed"), cfg.d_ff**-0.5)(h_BLF)


class EncoderLayer(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); attention both ways, within each document.

    Returns (x, None) for `decoder.layer_stack`; arguments positional for nn.remat's static_argnums.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BSE: jax.Array, bias_BHSS: jax.Array, deterministic: bool):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout)
        h_BSE = SelfAttention(cfg, name="attn")(make_norm(cfg, "attn_norm")(x_BSE), bias_BHSS)
        x_BSE = x_BSE + drop(h_BSE, deterministic=deterministic)
        h_BSE = Mlp(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x_BSE))
        x_BSE = x_BSE + drop(h_BSE, deterministic=deterministic)
        return constrain(x_BSE, ("batch", "length", "embed")), None


class DecoderLayer(nn.Module):
    """x + self_attn(norm(x)), x + cross_attn(norm(x), encoded), then x + mlp(norm(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLE: jax.Array, self_bias_BHLL: jax.Array, table_NH: jax.Array, encoded_BSE: jax.Array,
                 cross_bias_B1LS: jax.Array | None, deterministic: bool, decode: bool):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout)
        h_BLE = SelfAttention(cfg, name="self_attn")(make_norm(cfg, "self_attn_norm")(x_BLE), self_bias_BHLL,
                                                     table_NH, decode)
        x_BLE = x_BLE + drop(h_BLE, deterministic=deterministic)
        h_BLE = CrossAttention(cfg, name="cross_attn")(make_norm(cfg, "cross_attn_norm")(x_BLE), encoded_BSE,
                                                       cross_bias_B1LS, decode)
        x_BLE = x_BLE + drop(h_BLE, deterministic=deterministic)
        h_BLE = Mlp(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x_BLE))
        x_BLE = x_BLE + drop(h_BLE, deterministic=deterministic)
        return constrain(x_BLE, ("batch", "length", "embed")), None


def _positions(positions, batch: int, length: int) -> jax.Array:
    """int32 [B, L]; None -> one shared arange [1, L] (the biases are then computed once for all rows)."""
    if positions is None:
        return jnp.arange(length, dtype=jnp.int32)[None, :]
    return jnp.asarray(positions, jnp.int32)


def _segment_ids(segment_ids) -> jax.Array | None:
    return None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)


class EncoderStack(nn.Module):
    """Embedded inputs -> encoder layers -> final norm. Attention within equal segment ids."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BSE: jax.Array, positions_BS: jax.Array, segment_ids_BS: jax.Array | None,
                 deterministic: bool) -> jax.Array:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout)
        x_BSE = constrain(drop(x_BSE, deterministic=deterministic), ("batch", "length", "embed"))
        bias_BHSS = RelativePositionBias(cfg, bidirectional=True, name="relative_position")(positions_BS, positions_BS)
        bias_BHSS = bias_BHSS + mask_to_bias(segment_mask(segment_ids_BS, x_BSE.shape[1]))
        block = remat_block(EncoderLayer, cfg, _STATIC_ENCODER_ARGS)
        x_BSE = layer_stack(block, cfg, x_BSE, bias_BHSS, deterministic, n_layers=cfg.encoder_layers)
        return drop(make_norm(cfg, "final_norm")(x_BSE), deterministic=deterministic)


class DecoderStack(nn.Module):
    """Embedded targets (shifted right) -> decoder layers -> final norm.

    Self-attention: causal within equal decoder segment ids. Cross-attention: a target token of segment
    s sees the encoder tokens of segment s (0, padding, sees padding), or, without decoder segment ids
    (one example per row; always in decode mode), every encoder token of nonzero segment.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLE: jax.Array, encoded_BSE: jax.Array, positions_BL: jax.Array,
                 segment_ids_BL: jax.Array | None, encoder_segment_ids_BS: jax.Array | None,
                 deterministic: bool, decode: bool) -> jax.Array:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout)
        x_BLE = constrain(drop(x_BLE, deterministic=deterministic), ("batch", "length", "embed"))
        relative = RelativePositionBias(cfg, bidirectional=False, name="relative_position")
        if decode:
            segment_ids_BL = None  # one example per row: the cache holds one
        self_bias_BHLL = relative(positions_BL, positions_BL)
        self_bias_BHLL = self_bias_BHLL + mask_to_bias(causal_segment_mask(segment_ids_BL, x_BLE.shape[1]))
        if encoder_segment_ids_BS is None:
            cross_bias_B1LS = None
        elif segment_ids_BL is None:
            cross_bias_B1LS = mask_to_bias((encoder_segment_ids_BS != 0)[:, None, None, :])
        else:
            cross_bias_B1LS = mask_to_bias(segment_ids_BL[:, None, :, None] == encoder_segment_ids_BS[:, None, None, :])
        block = remat_block(DecoderLayer, cfg, _STATIC_DECODER_ARGS)
        x_BLE = layer_stack(block, cfg, x_BLE, self_bias_BHLL, relative.table, encoded_BSE, cross_bias_B1LS,
                            deterministic, decode, n_layers=cfg.decoder_layers)
        return drop(make_norm(cfg, "final_norm")(x_BLE), deterministic=deterministic)


class EncoderDecoder(nn.Module):
    """T5: inputs -> encoder -> decoder over the (shifted) targets -> float32 logits [B, L, V].

    `encode` and `decode` are also entry points of their own (`apply(..., method="encode")`), so that
    generation encodes once and then decodes token by token with a cache.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=1.0, dtype=dtype, param_dtype=param_dtype)
        self.encoder = EncoderStack(cfg)
        self.decoder = DecoderStack(cfg)
        if not cfg.resolved_tie_embeddings:
            self.lm_head = Dense(features=(cfg.vocab_size,), kernel_axes=("embed", "vocab"),
                                 init_std=cfg.d_model**-0.5, dtype=dtype, param_dtype=param_dtype,
                                 out_dtype=jnp.float32)

    def __call__(self, tokens, positions=None, segment_ids=None, *, encoder_tokens, encoder_positions=None,
                 encoder_segment_ids=None, deterministic: bool = True):
        """tokens/positions/segment_ids: the decoder side [B, L] (targets shifted right, starting with the
        pad id 0); encoder_*: the encoder side [B, S]. An example's two sides share one row and segment
        id; packed rows restart positions at 0 per example. None segment ids: one example per row, no
        padding; None positions: arange. Returns float32 logits [B, L, V]."""
        encoded_BSE = self.encode(encoder_tokens, encoder_positions, encoder_segment_ids,
                                  deterministic=deterministic)
        return self.decode(tokens, encoded_BSE, positions, segment_ids, encoder_segment_ids,
                           deterministic=deterministic)

    def encode(self, encoder_tokens, encoder_positions=None, encoder_segment_ids=None, *,
               deterministic: bool = True) -> jax.Array:
        """The encoder stack's output after its final norm [B, S, E], in the compute dtype."""
        tokens_BS = jnp.asarray(encoder_tokens, jnp.int32)
        batch, length = tokens_BS.shape
        return self.encoder(self.embed(tokens_BS), _positions(encoder_positions, batch, length),
                            _segment_ids(encoder_segment_ids), deterministic)

    def decode(self, tokens, encoded, positions=None, segment_ids=None, encoder_segment_ids=None, *,
               deterministic: bool = True, decode: bool = False) -> jax.Array:
        """float32 logits [B, L, V] of the decoder over `encoded` [B, S, E].

        decode=True: cached decoding (Flax convention, see relative.SelfAttention and CrossAttention).
        The first call (no "cache" yet; apply with mutable=["cache"]) takes the full-length targets
        (e.g. zeros [B, max_target_len]): it creates zeroed self-attention keys/values of that length
        and projects `encoded` once into the cross-attention's cached keys/values (so the cache must come
        from that call: zeros shaped like it, as infer/generate.py makes a decoder's, would hold zero
        cross-attention keys and values). Each later call
        takes the next token(s) [B, 1], writes them at the cache index and attends to what is written;
        its positions are the cache slots, so `positions` and `segment_ids` are ignored.
        `encoder_segment_ids` == 0 marks encoder padding, which cross-attention never sees.
        """
        cfg = self.config
        tokens_BL = jnp.asarray(tokens, jnp.int32)
        batch, length = tokens_BL.shape
        x_BLE = self.decoder(self.embed(tokens_BL), encoded, _positions(positions, batch, length),
                             _segment_ids(segment_ids), _segment_ids(encoder_segment_ids), deterministic, decode)
        if cfg.resolved_tie_embeddings:
            if cfg.family.scale_tied_logits:
                x_BLE = x_BLE * (cfg.d_model**-0.5)
            logits_BLV = self.embed.attend(x_BLE)
        else:
            logits_BLV = self.lm_head(x_BLE)
        return constrain(logits_BLV, ("batch", "length", "vocab"))
