"""Task heads for fine-tuning: a pretrained body (decoder or encoder) with a classification or tagging head.

`TaskModel` holds the body as the submodule "body", built exactly as pretraining builds it
(`build.make_model`), so `params["body"]` has the paths, shapes and dtypes of a pretraining run's (and
an `llm-jax export`'s) parameters and `init_from` restores it as a whole; the head, "head", is new:
    head/kernel [E, C], head/bias [C]   C = the run's number of labels
The body keeps its LM head (the decoder's lm_head when untied, the encoder's mlm_head): it is never
read by a task, so it gets no gradient, but keeping it makes the body's tree the export's, one for
one (restoring needs no renaming, and an exported fine-tuned body still reads as a language model).
Freezing it, or any part of the body, is the optimizer's business (finetune.freeze).

What the heads read (shape suffixes as in layers.py; C labels):
- classify: one vector per row, by `pooling`: "cls" the encoder's pooler (tanh(dense(h[:, 0])), BERT's
  sentence vector, so a bert export's pooler is used as pretrained), "last" the hidden state of the last
  real token (a decoder's final eos has seen the whole example), "mean" the mean over real tokens; then
  dropout and Dense(C) -> float32 logits [B, C].
- tag: dropout and Dense(C) at every position -> float32 logits [B, L, C].
A row holds one example (no packing): its real tokens are those with segment id > 0; padding is 0.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.models.build import make_model
from llm_jax.models.layers import Dense, to_dtype

KINDS = ("classify", "tag")
POOLINGS = ("cls", "last", "mean")


def pool(hidden_BLE: jax.Array, segment_ids_BL: jax.Array, pooling: str) -> jax.Array:
    """[B, E]: the hidden state of the last real token ("last") or the mean over the real tokens ("mean")."""
    real_BL = segment_ids_BL > 0
    if pooling == "last":
        last_B = jnp.maximum(jnp.sum(real_BL, axis=1) - 1, 0)  # rows are left-aligned: real tokens first
        return jnp.take_along_axis(hidden_BLE, last_B[:, None, None], axis=1)[:, 0]
    if pooling == "mean":
        weights_BL = real_BL.astype(jnp.float32)
        total_BE = jnp.einsum("bl,ble->be", weights_BL, hidden_BLE.astype(jnp.float32))
        return (total_BE / jnp.maximum(jnp.sum(weights_BL, axis=1, keepdims=True), 1.0)).astype(hidden_BLE.dtype)
    raise ValueError(f"pooling must be last or mean here (cls reads the encoder's pooler), got {pooling!r}")


class TaskModel(nn.Module):
    """A body (`make_model(config)`) under "body" and a head under "head"; see the module docstring.

    `config` is the body's ModelConfig (init_inputs and the steps read it as they read a body's).
    """

    config: ModelConfig
    kind: str  # classify | tag
    num_labels: int
    pooling: str = "cls"  # classify: cls | last | mean

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, token_types=None, *, deterministic: bool = True):
        """tokens/positions/segment_ids/token_types: int32 [B, L] (token_types: encoders only; pairs).
        Returns float32 logits: [B, C] (classify) or [B, L, C] (tag)."""
        cfg = self.config
        if self.kind not in KINDS:
            raise ValueError(f"TaskModel kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if cfg.family.encoder_decoder:
            raise ValueError(f"model.arch={cfg.arch} is an encoder-decoder: classify and tag heads read an "
                             "encoder or a decoder")
        tokens = jnp.asarray(tokens, jnp.int32)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        body = make_model(cfg, name="body")
        extra = {"token_types": token_types} if cfg.family.encoder else {}
        use_pooler = self.kind == "classify" and self.pooling == "cls"
        if cfg.family.encoder and use_pooler:
            x = body(tokens, positions, segment_ids, deterministic=deterministic, output="pooled", **extra)
        else:
            if use_pooler:
                raise ValueError(f"pooling=cls reads an encoder's pooler; model.arch={cfg.arch} has none")
            x = body(tokens, positions, segment_ids, deterministic=deterministic, output="hidden", **extra)
            if self.kind == "classify":
                x = pool(x, segment_ids, self.pooling)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        # The label axis is a handful of classes: replicated (None), as the encoder's token types are.
        head = Dense(features=(self.num_labels,), kernel_axes=("embed", None), use_bias=True, init_std=cfg.init_std,
                     dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), out_dtype=jnp.float32,
                     name="head")
        return head(x)
