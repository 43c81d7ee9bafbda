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
    objective: str = "clm"  # the pretraining task it learns (train.objective): clm | mlm
    # An encoder (models/encoder.py: bidirectional attention, post-norm blocks x = norm(x + f(x)), a
    # masked-LM head) instead of a decoder (models/decoder.py: causal, pre-norm blocks x + f(norm(x))).
    encoder: bool = False
    norm_eps: float = 1e-5  # the default of model.norm_eps

    @property
    def mlp_matrices(self) -> int:
        """The d_model x d_ff weight matrices of one MLP (gate, up and down when gated), for FLOPs."""
        return 3 if self.gated_mlp else 2


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
}

OBJECTIVES = ("clm", "mlm")
