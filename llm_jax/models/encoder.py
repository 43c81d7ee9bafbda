"""The BERT-style encoder: embeddings -> post-norm blocks attending both ways -> masked-LM head.

Parameters are laid out one for one as Hugging Face's `BertForMaskedLM` lays them out, so that
importing or exporting one is a mapping of names (and of head axes), never a change of the
network. Shape suffixes as in `layers.py` (B batch, L length, E embed, V vocab, T token types).

Parameter tree (unscanned; with `scan_layers` the blocks are one subtree "layers" whose leaves
have a leading [n_layers] axis named "layers", as in decoder.py), and the Hugging Face names:
    embed/embedding [V, E]                      bert.embeddings.word_embeddings
    pos_embed/embedding [P, E]                  bert.embeddings.position_embeddings (learned positions)
    type_embed/embedding [T, E]                 bert.embeddings.token_type_embeddings
    embed_norm/{scale,bias} [E]                 bert.embeddings.LayerNorm
    layer_{i}/attn/{query,key,value}            bert.encoder.layer.{i}.attention.self.{query,key,value}
              kernel [E, H, D], bias [H, D]
    layer_{i}/attn/out: kernel [H, D, E], bias  ...attention.output.dense
    layer_{i}/attn_norm/{scale,bias}            ...attention.output.LayerNorm
    layer_{i}/mlp/fc: kernel [E, F], bias [F]   ...intermediate.dense
    layer_{i}/mlp/proj: kernel [F, E], bias [E] ...output.dense
    layer_{i}/mlp_norm/{scale,bias}             ...output.LayerNorm
    mlm_head/transform: kernel [E, E], bias [E] cls.predictions.transform.dense
    mlm_head/transform_norm/{scale,bias} [E]    cls.predictions.transform.LayerNorm
    mlm_head/bias [V]                           cls.predictions.bias (the decoder is the tied embed)
    mlm_head/decoder/kernel [E, V]              cls.predictions.decoder (untied embeddings only)
    pooler: kernel [E, E], bias [E]             bert.pooler.dense (BertModel, BertForPreTraining,
                                                BertForSequenceClassification; BertForMaskedLM has none)
Norm scale/bias are LayerNorm.weight/bias. Hugging Face kernels are [out, in] (torch Linear): the
mapping (llm_jax/hf/bert.py, `llm-jax hf import` / `hf export`) transposes them and splits E into heads x
head_dim. One difference of function: dropout
acts on the residual branches, as in the decoder (layers.Attention), not also on the attention
probabilities.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.models.decoder import layer_stack, remat_block
from llm_jax.models.layers import (
    ACTIVATIONS,
    Attention,
    Dense,
    Embed,
    Mlp,
    constrain,
    make_norm,
    sinusoidal_positions,
    to_dtype,
)

TOKEN_TYPES = 2  # BERT's sentence A / sentence B

# The encoder's outputs (`Encoder.__call__(output=...)`).
OUTPUTS = ("logits", "hidden", "pooled")

# Positional index (self = 0) of EncoderBlock.__call__'s Python-valued argument.
_STATIC_BLOCK_ARGS = (4,)  # deterministic


class EncoderBlock(nn.Module):
    """Post-norm residual block (BERT): x = norm(x + attn(x)), then x = norm(x + mlp(x)).

    Attention is bidirectional within each document (the family is an encoder, layers.Attention).
    Returns (x, None) as DecoderBlock does, so `decoder.layer_stack` scans or unrolls it.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLE: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array | None,
                 deterministic: bool):
        cfg = self.config
        h_BLE = Attention(cfg, name="attn")(x_BLE, positions_BL, segment_ids_BL, False)
        x_BLE = make_norm(cfg, "attn_norm")(x_BLE + nn.Dropout(cfg.dropout)(h_BLE, deterministic=deterministic))
        h_BLE = Mlp(cfg, name="mlp")(x_BLE)
        x_BLE = make_norm(cfg, "mlp_norm")(x_BLE + nn.Dropout(cfg.dropout)(h_BLE, deterministic=deterministic))
        return constrain(x_BLE, ("batch", "length", "embed")), None


class MlmHead(nn.Module):
    """The masked-LM head: dense + activation + LayerNorm, then logits against the word embeddings
    (tied) or an own [E, V] kernel (untied), plus an output bias. Logits in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLE: jax.Array, embed: Embed) -> jax.Array:
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        h_BLE = Dense(features=(cfg.d_model,), kernel_axes=("embed", "mlp"), use_bias=True, init_std=cfg.init_std,
                      dtype=dtype, param_dtype=param_dtype, name="transform")(x_BLE)
        h_BLE = make_norm(cfg, "transform_norm")(ACTIVATIONS[cfg.resolved_activation](h_BLE))
        if cfg.resolved_tie_embeddings:
            logits_BLV = embed.attend(h_BLE)
        else:
            logits_BLV = Dense(features=(cfg.vocab_size,), kernel_axes=("embed", "vocab"), init_std=cfg.init_std,
                               dtype=dtype, param_dtype=param_dtype, out_dtype=jnp.float32, name="decoder")(h_BLE)
        bias_V = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                            (cfg.vocab_size,), param_dtype)
        return logits_BLV + bias_V.astype(jnp.float32)[None, None, :]


class Encoder(nn.Module):
    """Bidirectional encoder trained by masked LM; `config.arch` names its family (families.py).

    Same calling convention as the decoder (decoder.Transformer), so the train and eval steps serve
    both: the masked-LM logits at every position, float32 whatever the compute dtype; the loss
    weights pick the masked positions.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, token_types=None, *, deterministic: bool = True,
                 decode: bool = False, output: str = "logits"):
        """tokens/positions/segment_ids/token_types: int32 [batch, length].

        positions None -> arange; segment_ids None -> the whole row is one document. Packed rows give
        each document its own segment id (0 = padding) and positions restarting at 0; a token sees
        every token of its document, before and after it, and no other (padding sees only padding).
        token_types None -> zeros (every token of sentence A).
        output: "logits" -> float32 masked-LM logits [B, L, V]; "hidden" -> the last block's output
        [B, L, E]; "pooled" -> tanh(dense(first token's hidden)) [B, E], BERT's sentence vector for
        classification. Only the output asked for is computed (init creates every parameter).
        """
        cfg = self.config
        if decode:
            raise ValueError(f"model.arch={cfg.arch} is an encoder: it has no decode mode (KV cache)")
        if output not in OUTPUTS:
            raise ValueError(f"Encoder output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        tokens_BL = jnp.asarray(tokens, jnp.int32)
        batch, length = tokens_BL.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, :], (batch, length))
        positions_BL = jnp.asarray(positions, jnp.int32)
        segment_ids_BL = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        token_types_BL = jnp.zeros_like(tokens_BL) if token_types is None else jnp.asarray(token_types, jnp.int32)

        def table(rows, axes, name):
            return Embed(rows, cfg.d_model, axes=axes, init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype,
                         name=name)

        embed = table(cfg.vocab_size, ("vocab", "embed"), "embed")
        x_BLE = embed(tokens_BL)
        position = cfg.resolved_position
        if position == "learned":
            x_BLE = x_BLE + table(cfg.max_len, ("length", "embed"), "pos_embed")(positions_BL)
        elif position == "sinusoidal":
            x_BLE = x_BLE + sinusoidal_positions(positions_BL, cfg.d_model).astype(dtype)
        # Two rows: nothing to shard along them, so that axis stays replicated (None).
        x_BLE = x_BLE + table(TOKEN_TYPES, (None, "embed"), "type_embed")(token_types_BL)
        x_BLE = make_norm(cfg, "embed_norm")(x_BLE)
        x_BLE = nn.Dropout(cfg.dropout)(x_BLE, deterministic=deterministic)
        x_BLE = constrain(x_BLE, ("batch", "length", "embed"))

        block = remat_block(EncoderBlock, cfg, _STATIC_BLOCK_ARGS)
        x_BLE = layer_stack(block, cfg, x_BLE, positions_BL, segment_ids_BL, deterministic)

        # Init runs every head, so the parameter tree is the same whatever `output` later asks for.
        initializing = self.is_initializing()
        outputs = {"hidden": x_BLE}
        if output == "logits" or initializing:
            logits_BLV = MlmHead(cfg, name="mlm_head")(x_BLE, embed)
            outputs["logits"] = constrain(logits_BLV, ("batch", "length", "vocab"))
        if output == "pooled" or initializing:
            # The first token of the row ([CLS]); a classification batch holds one document per row.
            pooler = Dense(features=(cfg.d_model,), kernel_axes=("embed", "mlp"), use_bias=True,
                           init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, name="pooler")
            outputs["pooled"] = jnp.tanh(pooler(x_BLE[:, 0]))
        return outputs[output]
