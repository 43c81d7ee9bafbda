"""Weight-only int8: every matmul kernel and the embedding tables, symmetric, per output channel
(optionally per group of input channels), through qwix's quantized arrays.

What is quantized, by the logical axes the layers give each parameter (models/layers.py):
- Dense kernels (`kernel`: attention, MLP, output heads): one scale per output channel, the
  maximum |w| over the contracted input axes / 127. A kernel's axes are (inputs..., outputs...);
  only the attention output projection contracts two axes (heads, head_dim), every other kernel
  its first. A scanned stack's leading `layers` axis is a channel axis like an output: each layer
  keeps its own scales.
- The embedding tables (Embed: tokens, and learned positions and token types where the family has
  them): one scale per row, which serves both the lookup (a row) and the tied output projection
  (a token's row is an output channel of the logits).
- `group_size` N: one scale per N consecutive input channels of each output channel (along the
  last contracted axis), for weights with outliers; N must divide that axis.
Norm scales, biases and T5's relative-position tables stay float: they are small, and the first
two scale every activation, where an int8 rounding error would reach every token.

Why qwix's arrays and not its PTQ provider (`qwix.quantize_model`): the provider quantizes the
weights it meets in `jax.lax.dot_general`/`einsum` calls that it intercepts, which (a) never sees an
embedding lookup (a gather), so the embeddings would stay float; (b) never sees our CPU matmul,
an XLA FFI custom call (kernels/cpu_kernels.py) that Dense uses on CPU in float32, so nothing would
be quantized where this project runs most. So the weights are quantized here with
`qwix.quantize` and stored as `qwix.QArray`s in the parameter tree; `layers.dequantized` turns
one back into a float array inside the compiled call, at its use, and the model code is
otherwise unchanged.

Memory and speed: between calls (and on disk) the weights are int8. A decode step on one CPU device
(at most `layers.CPU_INT8_MAX_ROWS` rows: batch 1, a few beams) multiplies by the int8 values as they
are stored (`cpu_kernels.int8_matmul`, csrc/cpu_int8_matmul.cc, which widens them in registers), so
the decode loop carries the int8 kernels and reads a quarter of float32's bytes per token: at batch 1,
decoding is faster than float (docs/benchmarks.md). Elsewhere (more rows, other devices) a weight is
dequantized inside the compiled call, at its use; in generation's decode loop XLA then hoists that
out of the loop (loop-invariant code motion), so the loop carries float32 kernels and decodes at the
float speed, and the float copies are temporaries of the call.

On disk (`llm-jax quantize`: an export, commands/export.py's layout) each quantized leaf is a
dict {"qvalue": int8, "scale": float32} in the same place of the tree, and export.json says
`"quantization": {"format": "int8", ...}`; `from_stored` turns the dicts back into QArrays when
train/exported.py reads the export for eval or generate.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from llm_jax.config import ConfigError, ModelConfig
from llm_jax.models.build import init_inputs, make_model

FORMAT = "int8"
STORED_KEYS = ("qvalue", "scale")  # a quantized leaf on disk
LAYER_AXIS = "layers"  # a scanned stack's leading axis (models/decoder.py layer_stack)
TWO_AXIS_INPUT = ("heads", "head_dim")  # the attention output projection's contracted axes


def logical_axes(config: ModelConfig) -> dict[tuple[str, ...], tuple[str | None, ...]]:
    """The logical axis names of every parameter, by path (('decoder', 'layers', 'mlp', 'fc',
    'kernel') -> ('layers', 'embed', 'mlp')), from an abstract init: nothing is computed."""
    model = make_model(config)
    tokens, extra = init_inputs(config, 8)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, **extra))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {_path_names(path): tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else (None,) * leaf.ndim
            for path, leaf in leaves}


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def contracted_axes(path: tuple[str, ...], names: tuple[str | None, ...]) -> tuple[int, ...] | None:
    """The axes of a weight that a matmul contracts (reduced into one scale per output channel), or
    None for a parameter that stays float."""
    offset = 1 if names and names[0] == LAYER_AXIS else 0
    own = names[offset:]
    if path[-1] == "kernel":
        n_in = len(TWO_AXIS_INPUT) if own[:2] == TWO_AXIS_INPUT else 1
        return tuple(range(offset, offset + n_in))
    if path[-1] == "embedding":
        return (offset + 1,)  # the embed axis; each row (a token, a position) is a channel
    return None


def quantize_weight(weight: jax.Array, contracted: tuple[int, ...], group_size: int | None) -> qwix.QArray:
    """Symmetric int8 with float32 scales: one per output channel, or per `group_size` input channels
    along the last contracted axis."""
    channels = tuple(a for a in range(weight.ndim) if a not in contracted)
    tiled = None
    if group_size:
        axis = contracted[-1]
        if weight.shape[axis] % group_size:
            raise ConfigError(f"--group-size {group_size} does not divide the input axis ({weight.shape[axis]}) "
                              f"of a weight of shape {tuple(weight.shape)}; use a divisor of it")
        tiled = {axis: group_size}
    return qwix.quantize(jnp.asarray(weight, jnp.float32), jnp.int8, channelwise_axes=channels, tiled_axes=tiled,
                         scale_dtype=jnp.float32)


def quantize_params(params: Any, config: ModelConfig, group_size: int | None = None) -> Any:
    """`params` (unboxed) with every matmul kernel and embedding table as int8 QArrays."""
    if group_size is not None and group_size < 1:
        raise ConfigError(f"--group-size must be a positive number of input channels, got {group_size}")
    axes = logical_axes(config)

    def one(path, leaf):
        contracted = contracted_axes(_path_names(path), axes[_path_names(path)])
        return leaf if contracted is None else quantize_weight(leaf, contracted, group_size)

    # One compiled program: op by op, qwix's quantization of each leaf takes ~10x longer.
    return jax.jit(lambda tree: jax.tree_util.tree_map_with_path(one, tree))(params)


def quantized_paths(qparams: Any) -> list[str]:
    """'/'-joined paths of the quantized leaves, for export.json."""
    leaves = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=_is_qarray)[0]
    return ["/".join(_path_names(path)) for path, leaf in leaves if _is_qarray(leaf)]


def _is_qarray(x) -> bool:
    return isinstance(x, qwix.QArray)


def to_stored(qparams: Any) -> Any:
    """QArrays -> {"qvalue", "scale"} dicts: plain arrays, which orbax writes and reads without a target."""
    return jax.tree.map(lambda x: {"qvalue": x.qvalue, "scale": x.scale} if _is_qarray(x) else x, qparams,
                        is_leaf=_is_qarray)


def from_stored(tree: Any) -> Any:
    """The reverse of `to_stored`: each {"qvalue", "scale"} dict becomes a QArray again."""
    if isinstance(tree, dict):
        if set(tree) == set(STORED_KEYS):
            return qwix.QArray(qvalue=tree["qvalue"], scale=tree["scale"], qtype=jnp.int8)
        return {k: from_stored(v) for k, v in tree.items()}
    return tree


def dequantize_params(qparams: Any) -> Any:
    """Float32 parameters again (for a check, or to fine-tune from an int8 export)."""
    return jax.tree.map(lambda x: qwix.dequantize(x) if _is_qarray(x) else x, qparams, is_leaf=_is_qarray)


def param_bytes(tree: Any) -> int:
    """Bytes the parameters take in memory (and, uncompressed, on disk): int8 values and float32 scales
    count as what they are."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
