"""The network of a config: the family (models/families.py) says whether it is a decoder, an encoder
or an encoder-decoder, and which batch arrays it reads."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.models.decoder import Transformer
from llm_jax.models.encdec import EncoderDecoder
from llm_jax.models.encoder import Encoder

# The encoder side of an encoder-decoder's batch (data/pipeline.py), [batch, seq_len] each. The
# decoder side uses the keys every family reads: inputs, targets, segment_ids, positions, weights.
ENCODER_KEYS = ("encoder_inputs", "encoder_segment_ids", "encoder_positions")


def make_model(config: ModelConfig, name: str | None = None) -> nn.Module:
    """The Linen module for `config`. Every family's module takes (tokens, positions=, segment_ids=,
    deterministic=) and returns float32 logits [batch, length, vocab]; an encoder-decoder's also takes
    the encoder side as keyword arguments (`encoder_inputs`). `name`: its name as a submodule (a task
    model's body, models/heads.py)."""
    if config.family.encoder_decoder:
        return EncoderDecoder(config, name=name)
    if config.family.encoder:
        return Encoder(config, name=name)
    return Transformer(config, name=name)


def encoder_inputs(config: ModelConfig, batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments that carry a batch's encoder side to an encoder-decoder's __call__
    (encoder_tokens, encoder_positions, encoder_segment_ids); {} for the other families."""
    if not config.family.encoder_decoder:
        return {}
    return {"encoder_tokens": batch["encoder_inputs"], "encoder_positions": batch["encoder_positions"],
            "encoder_segment_ids": batch["encoder_segment_ids"]}


def init_inputs(config: ModelConfig, seq_len: int) -> tuple[jax.Array, dict[str, Any]]:
    """(tokens, keyword arguments) that `model.init` needs to create every parameter. The lengths do
    not shape any parameter (learned position tables are max_len long), so seq_len serves both sides."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    if not config.family.encoder_decoder:
        return tokens, {}
    return tokens, {"encoder_tokens": tokens}
