"""The decoder-only language model: embeddings -> a stack of blocks -> final norm -> logits.

Shape suffixes as in `layers.py` (B batch, L length, E embed, V vocab).

Parameter tree (unscanned; with `scan_layers` the blocks are one subtree "layers" whose leaves
have a leading [n_layers] axis named "layers"):
    embed/embedding [V, E]         pos_embed/embedding [P, E] (learned positions only)
    layer_{i}/attn_norm, attn/{query,key,value,out}, mlp_norm, mlp/{fc,proj | gate,up,proj}
    final_norm                     lm_head/kernel [E, V] (untied embeddings only)
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.kernels import cpu_kernels
from llm_jax.models.layers import DecoderBlock, Dense, Embed, constrain, make_norm, sinusoidal_positions, to_dtype

# Name of the scanned stack (`scan_layers`): every leaf under it has a leading [n_layers] axis. The
# optimizer reads it to keep LAMB's trust ratios per layer (optim.py).
SCANNED_LAYERS = "layers"

# Positional indices (self = 0) of DecoderBlock.__call__'s Python-valued arguments.
_STATIC_BLOCK_ARGS = (4, 5)  # deterministic, decode


def remat_block(block: type[nn.Module], config: ModelConfig, static_argnums: tuple[int, ...]) -> type[nn.Module]:
    """`block`, wrapped in `nn.remat` when the backward pass should recompute it.

    full: keep only each block's input, recompute the rest. dots: also keep the outputs of
    matmuls without batch dimensions (the weight projections), recompute only the cheap
    elementwise work and attention. `prevent_cse` is only needed outside `scan`.
    `static_argnums`: the positions (self = 0) of the block's Python-valued arguments.
    """
    if config.remat == "none":
        return block
    policy = None
    if config.remat == "dots":  # weight projections, as dots or as the CPU matmul kernel (cpu_kernels.py)
        policy = jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
            jax.checkpoint_policies.save_only_these_names(cpu_kernels.MATMUL_NAME))
    return nn.remat(block, policy=policy, prevent_cse=not config.scan_layers, static_argnums=static_argnums)


def layer_stack(block: type[nn.Module], config: ModelConfig, x_BLE: jax.Array, *args,
                n_layers: int | None = None) -> jax.Array:
    """`n_layers` blocks (None: `config.n_layers`) in sequence, called as block(config)(x_BLE, *args)
    -> (x_BLE, None). An encoder-decoder's two stacks each pass their own count.

    With `scan_layers`, one compiled body looped by `nn.scan`: the subtree SCANNED_LAYERS, whose
    leaves have a leading [n_layers] axis named "layers" (what LAMB's per-layer trust ratios and the
    checkpoints' scan conversion read); else the subtrees layer_0, layer_1, ... Called inside a
    compact method, so the blocks belong to the calling module. `args` are the same for every layer.
    """
    n_layers = config.n_layers if n_layers is None else n_layers
    if config.scan_layers:
        stack = nn.scan(
            block,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x_BLE, _ = stack(config, name=SCANNED_LAYERS)(x_BLE, *args)
        return x_BLE
    for i in range(n_layers):
        x_BLE, _ = block(config, name=f"layer_{i}")(x_BLE, *args)
    return x_BLE


class Transformer(nn.Module):
    """Decoder-only LM; `config.arch` names its family (models/families.py): norms, biases, MLP, positions.

    Returns float32 logits whatever the compute dtype, so the loss never sees bfloat16.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, *, deterministic: bool = True,
                 decode: bool = False, output: str = "logits"):
        """tokens/positions/segment_ids: int32 [batch, length]. Returns float32 logits [batch, length, vocab],
        or with output="hidden" the final norm's output [batch, length, embed] (what task heads read;
        init still creates the LM head, so the parameter tree is the same whatever `output` asks).

        positions None -> arange (in decode mode: continuing from the tokens already cached);
        segment_ids None -> one document, no padding. Packed rows give each document its own
        segment id (0 = padding) and positions restarting at 0; documents never attend to each other.
        decode=True: autoregressive use with a KV cache in the "cache" collection (Flax convention:
        init with decode=True and the full max length to create the cache; then apply with
        mutable=["cache"]). In decode mode segment ids only mark padding (0): the left padding of a
        batch of prompts, which later tokens never attend to (layers.Attention).
        """
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        tokens_BL = jnp.asarray(tokens, jnp.int32)
        batch, length = tokens_BL.shape
        positions_BL = self._default_positions(batch, length, decode) if positions is None else positions
        positions_BL = jnp.asarray(positions_BL, jnp.int32)
        segment_ids_BL = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)

        embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, dtype=dtype,
                      param_dtype=param_dtype, name="embed")
        x_BLE = embed(tokens_BL)
        position = cfg.resolved_position
        if position == "learned":
            x_BLE = x_BLE + Embed(cfg.max_len, cfg.d_model, axes=("length", "embed"), init_std=cfg.init_std,
                                  dtype=dtype, param_dtype=param_dtype, name="pos_embed")(positions_BL)
        elif position == "sinusoidal":
            x_BLE = x_BLE + sinusoidal_positions(positions_BL, cfg.d_model).astype(dtype)
        x_BLE = nn.Dropout(cfg.dropout)(x_BLE, deterministic=deterministic)
        x_BLE = constrain(x_BLE, ("batch", "length", "embed"))

        block = remat_block(DecoderBlock, cfg, _STATIC_BLOCK_ARGS)
        x_BLE = layer_stack(block, cfg, x_BLE, positions_BL, segment_ids_BL, deterministic, decode)

        x_BLE = make_norm(cfg, "final_norm")(x_BLE)
        if output not in ("logits", "hidden"):
            raise ValueError(f"Transformer output must be logits or hidden, got {output!r}")
        if output == "hidden" and not self.is_initializing():
            return x_BLE
        if cfg.resolved_tie_embeddings:
            logits_BLV = embed.attend(x_BLE)
        else:
            logits_BLV = Dense(features=(cfg.vocab_size,), kernel_axes=("embed", "vocab"), init_std=cfg.init_std,
                               dtype=dtype, param_dtype=param_dtype, out_dtype=jnp.float32, name="lm_head")(x_BLE)
        if output == "hidden":  # initializing: the LM head exists, the caller reads the hidden states
            return x_BLE
        return constrain(logits_BLV, ("batch", "length", "vocab"))

    def _default_positions(self, batch: int, length: int, decode: bool) -> jax.Array:
        """arange, or in decode mode the next `length` positions after those already cached."""
        start = 0
        if decode:
            initialized = self.has_variable("cache", "position")
            next_position = self.variable("cache", "position", lambda: jnp.array(0, dtype=jnp.int32))
            if initialized:
                start = next_position.value
                next_position.value = start + length
        positions_1L = (start + jnp.arange(length, dtype=jnp.int32))[None, :]
        return jnp.broadcast_to(positions_1L, (batch, length))


def count_params(params) -> int:
    """Number of scalars in a (boxed or unboxed, concrete or abstract) parameter tree."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.unbox(params)))
