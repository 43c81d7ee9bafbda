"""The network of a config: the family (models/families.py) says whether it is a decoder or an encoder."""

from __future__ import annotations

import flax.linen as nn

from llm_jax.config import ModelConfig
from llm_jax.models.decoder import Transformer
from llm_jax.models.encoder import Encoder


def make_model(config: ModelConfig) -> nn.Module:
    """The Linen module for `config`. Every family's module takes (tokens, positions=, segment_ids=,
    deterministic=) and returns float32 logits [batch, length, vocab]."""
    if config.family.encoder:
        return Encoder(config)
    return Transformer(config)
