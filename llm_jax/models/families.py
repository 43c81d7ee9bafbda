"""What each model family is, said once: `model.arch` names an entry of `FAMILIES`.

The layers, the config's defaults and the FLOPs count read their family from here instead of
testing `arch` themselves, so a new family (bert, t5) is a new entry, not edits spread through
the code. No imports from llm_jax: the config reads this module to check and default its keys.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
    """The choices that tell one family's network from another's; sizes come from ModelConfig."""

    norm: str  # "layer" (LayerNorm: scale and bias) | "rms" (RMSNorm: scale only)
    bias: bool  # whether the attention and MLP projections have biases
    activation: str  # "gelu_tanh" (GELU, tanh approximation) | "gelu" (exact, erf) | "silu"
    gated_mlp: bool  # activation(gate) * up, then down (GLU variants), instead of activation(fc), then proj
    position: str  # the default of model.position: learned | sinusoidal | rope
    tie_embeddings: bool  # the default of model.tie_embeddings: the output projection reuses the embedding
    objective: str = "clm"  # the pretraining task it learns (the default of train.objective)
    # An encoder (models/encoder.py: bidirectional attention, post-norm blocks x = norm(x + f(x)), a
    # masked-LM head) instead of a decoder (models/decoder.py: causal, pre-norm blocks x + f(norm(x))).
    encoder: bool = False
    norm_eps: float = 1e-5  # the default of model.norm_eps
    # An encoder-decoder (models/encdec.py): a bidirectional encoder stack, then a causal decoder stack
    # whose blocks also attend to the encoder's output (cross-attention); inputs -> targets.
    encoder_decoder: bool = False
    # Every train.objective the family can learn; empty: only `objective`.
    other_objectives: tuple[str, ...] = ()
    # Tied output projection scaled by d_model ** -0.5 before the logits (the original T5's convention).
    scale_tied_logits: bool = False

    @property
    def objectives(self) -> tuple[str, ...]:
        return (self.objective, *self.other_objectives)


FAMILIES = {
    # GPT-2 (Radford et al. 2019): LayerNorm, biases everywhere, GELU MLP, learned positions, tied.
    "gpt2": Family(norm="layer", bias=True, activation="gelu_tanh", gated_mlp=False, position="learned",
                   tie_embeddings=True),
    # LLaMA (Touvron et al. 2023): RMSNorm, no biases, SwiGLU MLP, rotary positions, untied.
    "llama": Family(norm="rms", bias=False, activation="silu", gated_mlp=True, position="rope",
                    tie_embeddings=False),
    # BERT (Devlin et al. 2019): a bidirectional encoder trained by masked LM; post-LayerNorm blocks
    # (eps 1e-12), exact GELU, biases everywhere, learned positions and token types, tied MLM output.
    "bert": Family(norm="layer", bias=True, activation="gelu", gated_mlp=False, position="learned",
                   tie_embeddings=True, objective="mlm", encoder=True, norm_eps=1e-12),
    # T5 v1.1 (Raffel et al. 2020; the v1.1 checkpoints): pre-norm RMSNorm blocks (eps 1e-6) without
    # biases, bucketed relative position biases, gated-GELU (tanh) MLP, untied output, no 1/sqrt(d)
    # attention scaling. Learns span corruption, and input -> target pairs (seq2seq). The original T5
    # is the same family with model.activation=relu, model.gated_mlp=false, model.tie_embeddings=true.
    "t5": Family(norm="rms", bias=False, activation="gelu_tanh", gated_mlp=True, position="relative",
                 tie_embeddings=False, objective="span", norm_eps=1e-6, encoder_decoder=True,
                 other_objectives=("seq2seq",), scale_tied_logits=True),
}

# clm: next token (decoders); mlm: masked tokens (encoders); span: T5's span corruption and seq2seq:
# input -> target pairs (encoder-decoders).
OBJECTIVES = ("clm", "mlm", "span", "seq2seq")
