"""The optax transformation: AdamW or LAMB, warmup + cosine schedule, clipping, decay mask; for
fine-tuning, frozen parameters, the task head's learning rate and layer-wise learning-rate decay.

Precision: the optimizer always works in float32. With `model.param_dtype=bfloat16` it sees float32
copies of the gradients and parameters, so both Adam moments are float32 (optax's `mu_dtype` covers
only the first; the second would follow the parameters), and only the update is rounded to bfloat16
when it is applied.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from llm_jax.config import FinetuneConfig, OptimizerConfig
from llm_jax.config.checks import freeze_layers
from llm_jax.models.decoder import SCANNED_LAYERS

# Weight decay pulls a weight towards zero. That is a prior for matmul kernels and token embeddings
# (decayed), not for norm scales (zero would switch a channel off), biases (offsets, no scale to
# regularise) or learned position embeddings (a lookup table read at every step: decay only shrinks
# the position signal); none of those three is decayed.
NO_DECAY_NAMES = ("bias", "scale")  # leaf names: Norm scale/bias, Dense bias
NO_DECAY_MODULES = ("pos_embed", "type_embed")  # module names: the learned position and token-type tables


# The modules below the first block: what `finetune.freeze=embeddings` freezes and layer decay treats
# as the lowest layer.
EMBEDDING_MODULES = ("embed", "pos_embed", "type_embed", "embed_norm")
_BLOCK = re.compile(r"layer_(\d+)$")  # an unrolled block (models/decoder.layer_stack)


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _is_box(x) -> bool:
    """A Flax metadata box (nn.Partitioned): a leaf for the labelling below, so that the labels of a
    boxed tree (state init under eval_shape) and of its plain arrays (updates) are the same tree."""
    from flax.core import meta

    return isinstance(x, meta.AxisMetadata)


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at the schedule's end.

    The end is `optimizer.decay_steps`, or `total_steps` (train.steps) when that is 0.
    """
    total_steps = config.decay_steps or total_steps
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=config.lr * config.min_lr_ratio,
    )


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: kernels and token embeddings (see NO_DECAY_NAMES)."""

    def wants_decay(path, _leaf) -> bool:
        names = _names(path)
        return names[-1] not in NO_DECAY_NAMES and not set(names) & set(NO_DECAY_MODULES)

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def stacked_layers_mask(params: Any, scan_layers: bool) -> Any:
    """True for leaves whose leading axis is the layer: those under a `scan_layers` stack
    (models/decoder.layer_stack), at the top of a decoder's tree or inside each of an
    encoder-decoder's stacks (encoder/layers, decoder/layers)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: scan_layers and SCANNED_LAYERS in _names(path)[:-1], params)


def scale_by_layerwise_trust_ratio(scan_layers: bool) -> optax.GradientTransformation:
    """LAMB's trust ratio ||param|| / ||update||, one per layer whatever the parameter layout.

    optax.scale_by_trust_ratio takes one ratio per leaf. A scanned stack holds every layer in one
    leaf [n_layers, ...], which would give all layers one ratio; for those leaves the norms are
    taken over all axes but the leading one, so each layer keeps its own ratio, as unscanned.
    """

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)

        def scale(update, param, stacked):
            axes = tuple(range(1, param.ndim)) if stacked else None
            param_norm = jnp.sqrt(jnp.sum(jnp.square(param), axis=axes, keepdims=stacked))
            update_norm = jnp.sqrt(jnp.sum(jnp.square(update), axis=axes, keepdims=stacked))
            ratio = param_norm / update_norm
            # As in optax: a zero parameter or update leaves the update as it is.
            ratio = jnp.where((param_norm == 0.0) | (update_norm == 0.0), jnp.ones_like(ratio), ratio)
            return update * ratio

        return jax.tree.map(scale, updates, params, stacked_layers_mask(params, scan_layers)), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def lamb(schedule: optax.Schedule, config: OptimizerConfig, scan_layers: bool) -> optax.GradientTransformation:
    """optax.lamb's own chain, with the trust ratio per layer of a scanned stack."""
    return optax.chain(
        optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        scale_by_layerwise_trust_ratio(scan_layers),
        optax.scale_by_learning_rate(schedule),
    )


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` on float32 copies of gradients and parameters: its state (Adam's moments) is float32
    whatever `model.param_dtype` says, so low-precision parameters keep full-precision moments. The
    update comes out float32 and `optax.apply_updates` rounds it to the parameter's dtype."""

    def up(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init_fn(params):
        return inner.init(up(params))

    def update_fn(updates, state, params=None):
        return inner.update(up(updates), state, None if params is None else up(params))

    return optax.GradientTransformation(init_fn, update_fn)


def describe_dtypes(params: Any, opt_state: Any, compute_dtype: str) -> str:
    """One log line saying which dtype holds what, e.g. 'params bfloat16, optimizer moments float32, ...'."""

    def floating(tree) -> str:
        kinds = sorted({str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)})
        return "/".join(kinds) or "none"

    return f"params {floating(params)}, optimizer moments {floating(opt_state)}, compute {compute_dtype}"


def _block(names: tuple[str, ...]) -> int | None:
    """The index of the unrolled block a parameter belongs to, or None."""
    for name in names:
        match = _BLOCK.match(name)
        if match:
            return int(match.group(1))
    return None


def _part(names: tuple[str, ...], head_name: str) -> str:
    """head | embeddings | blocks | other (final norms, the LM heads, a pooler, position biases)."""
    if names[0] == head_name:
        return "head"
    if set(names) & set(EMBEDDING_MODULES):
        return "embeddings"
    if SCANNED_LAYERS in names[:-1] or _block(names) is not None:
        return "blocks"
    return "other"


def freeze_labels(params: Any, finetune: FinetuneConfig) -> Any:
    """"frozen" or "train" for each parameter (boxes count as leaves): `finetune.freeze` says which.

    layers:N freezes the embeddings and blocks 0..N-1 (the bottom of the network; of each stack of
    an encoder-decoder); body freezes all but the task head (`finetune.head_name`).
    """
    n = freeze_layers(finetune.freeze)

    def label(path, _leaf) -> str:
        names = _names(path)
        part = _part(names, finetune.head_name)
        frozen = {"embeddings": part == "embeddings", "body": part != "head",
                  "none": False}.get(finetune.freeze)
        if n is not None:
            frozen = part == "embeddings" or (part == "blocks" and _block(names) < n)
        return "frozen" if frozen else "train"

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_box)


def lr_factors(params: Any, finetune: FinetuneConfig, lr: float) -> Any:
    """Each parameter's learning rate as a multiple of optimizer.lr's: the task head head_lr / lr; with
    layer decay block i of n layer_decay**(n - i), the embeddings layer_decay**(n + 1).

    A stacked leaf of `scan_layers` holds every block: its factor is an array [n, 1, ...], one per
    block, broadcast over the rest, so scanned and unrolled layers learn alike. n is counted in the
    tree itself (the blocks beside a parameter, or a stacked leaf's leading axis): an encoder-decoder's
    stacks each count their own.
    """
    decay = finetune.layer_decay
    stacks: dict[tuple[str, ...], int] = {}  # the parent of unrolled blocks -> how many blocks it holds
    n_layers = 0  # the deepest stack's: the embeddings sit below it
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = _names(path)
        block = _block(names)
        if block is not None:
            parent = names[:[_BLOCK.match(x) is not None for x in names].index(True)]
            stacks[parent] = max(stacks.get(parent, 0), block + 1)
            n_layers = max(n_layers, block + 1)
        elif SCANNED_LAYERS in names[:-1]:
            n_layers = max(n_layers, leaf.shape[0])

    def factor(path, leaf):
        names = _names(path)
        part = _part(names, finetune.head_name)
        if part == "head":
            return finetune.head_lr / lr if finetune.head_lr else 1.0
        if part == "other" or decay == 1.0:
            return 1.0
        if part == "embeddings":
            return decay ** (n_layers + 1)
        if SCANNED_LAYERS in names[:-1]:
            n = leaf.shape[0]
            return (decay ** (n - jnp.arange(n, dtype=jnp.float32))).reshape((n,) + (1,) * (leaf.ndim - 1))
        block = _block(names)
        parent = names[:[_BLOCK.match(x) is not None for x in names].index(True)]
        return decay ** (stacks[parent] - block)

    return jax.tree_util.tree_map_with_path(factor, params)


def scale_by_lr_factors(finetune: FinetuneConfig, lr: float) -> optax.GradientTransformation:
    """Multiplies each update by its parameter's `lr_factors`: the update already holds the scheduled
    learning rate (and AdamW's decay term, or LAMB's trust ratio), so this is that parameter's own
    learning rate on the same schedule. Not `optax.partition` with one optimizer per rate: a stacked
    leaf needs a rate per block, which no partition of leaves can give."""

    def update_fn(updates, state, params=None):
        del params
        factors = lr_factors(updates, finetune, lr)
        return jax.tree.map(lambda u, f: (u * f).astype(u.dtype), updates, factors), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def make_optimizer(config: OptimizerConfig, total_steps: int, scan_layers: bool = False,
                   finetune: FinetuneConfig | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Built once per run; the schedule is returned too so the trainer can log the learning rate.

    `scan_layers`: the parameters hold the blocks as one stacked subtree (model.scan_layers), which
    LAMB needs to know to keep one trust ratio per layer.

    `finetune.freeze`: `optax.partition` gives the frozen parameters `optax.set_to_zero()` (no update,
    no optimizer state: optax leaves a MaskedNode where their moments would be) and the others the
    clipped optimizer, so clipping sees only the gradients that are applied. With nothing frozen and
    no learning-rate factors the optimizer (and its state tree) is what pretraining has always used.
    """
    schedule = make_schedule(config, total_steps)
    if config.name == "adamw":
        core = in_float32(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                                      weight_decay=config.weight_decay, mask=decay_mask))
    elif config.name == "lamb":
        core = in_float32(lamb(schedule, config, scan_layers))
    else:  # validate() rejects other names before we get here
        raise ValueError(f"unknown optimizer {config.name!r}")
    # Always a chain of two: clip_norm=0 (no clipping) and clip_norm>0 then give the same optimizer-state
    # tree (both states are EmptyState), so a run resumes whichever way the setting was changed.
    clip = optax.clip_by_global_norm(config.clip_norm) if config.clip_norm > 0 else optax.identity()
    tx = optax.chain(clip, core)
    finetune = finetune or FinetuneConfig()
    if finetune.freeze != "none":
        tx = optax.partition({"train": tx, "frozen": optax.set_to_zero()},
                             lambda params: freeze_labels(params, finetune))
    if finetune.head_lr or finetune.layer_decay != 1.0:
        tx = optax.chain(tx, scale_by_lr_factors(finetune, config.lr))
    return tx, schedule
