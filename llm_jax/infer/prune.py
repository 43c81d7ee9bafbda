"""Magnitude pruning: the smallest weights of the matmul kernels set to exactly zero, and the mask.

What is pruned: every Dense kernel of the blocks (attention and MLP projections) and of the heads
that do not project onto the vocabulary. Kept dense, as in the pruning literature (SparseGPT,
Wanda): the token embeddings and any kernel with a `vocab` axis (the untied output projection),
whose rows are the tokens themselves (half of each row zeroed damages every token's input or
logit at once, for a few percent of the weights); norm scales, biases and position tables never.

- `structure="unstructured"`: `round(sparsity * n)` weights zeroed, exactly. Ties in |w| are
  broken by position in the flattened weight (a stable sort: the earlier one goes first), so the
  same weights give the same mask on any machine.
  `scope="layer"`: that count per kernel, and per layer of a scanned stack ([n_layers, ...]: each
  layer its own threshold). `scope="global"`: one threshold over all pruned kernels together, so
  layers with larger weights keep more of them.
- `structure="2:4"`: in every run of 4 consecutive input channels of each output channel, the two
  of smallest |w| are zeroed (ties: the later one goes), the pattern sparse tensor cores run at
  double speed. Sparsity is 0.5 by definition; the input size must be a multiple of 4.

The mask (True: the weight is kept) is saved with the export (`mask/`, only the pruned kernels),
and a run started from it (`init_from`) keeps the zeros fixed (train/optim.py `keep_masked_zero`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from llm_jax.config import ConfigError, ModelConfig
from llm_jax.infer.quantize import LAYER_AXIS, contracted_axes, logical_axes

STRUCTURES = ("unstructured", "2:4")
SCOPES = ("layer", "global")
Path = tuple[str, ...]


def check_options(sparsity: float, structure: str, scope: str) -> None:
    """One-line ConfigErrors for options that cannot prune anything sensible."""
    if structure not in STRUCTURES:
        raise ConfigError(f"--structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
    if scope not in SCOPES:
        raise ConfigError(f"--scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if not (math.isfinite(sparsity) and 0.0 < sparsity < 1.0):
        raise ConfigError(f"--sparsity is the fraction of weights zeroed, in (0, 1); got {sparsity}")
    if structure == "2:4" and sparsity != 0.5:
        raise ConfigError(f"--structure 2:4 zeroes 2 of every 4 weights: --sparsity must be 0.5, got {sparsity}")
    if structure == "2:4" and scope == "global":
        raise ConfigError("--structure 2:4 chooses within each group of 4 weights: --scope global does not apply")


def prunable(config: ModelConfig) -> dict[Path, tuple[tuple[int, ...], bool]]:
    """The pruned kernels by path: (their contracted axes, whether axis 0 is a scanned stack's layer)."""
    chosen = {}
    for path, names in logical_axes(config).items():
        contracted = contracted_axes(path, names)
        if path[-1] == "kernel" and contracted is not None and "vocab" not in names:
            chosen[path] = (contracted, names[0] == LAYER_AXIS)
    return chosen


def _smallest(magnitude: np.ndarray, count: int) -> np.ndarray:
    """Bool mask (True: kept) of a flat array with its `count` smallest entries dropped, ties by index."""
    keep = np.ones(magnitude.size, bool)
    keep[np.argsort(magnitude, kind="stable")[:count]] = False
    return keep


def _unstructured_layer(weight: np.ndarray, sparsity: float, stacked: bool) -> np.ndarray:
    layers = weight.reshape(weight.shape[0], -1) if stacked else weight.reshape(1, -1)
    masks = [_smallest(np.abs(row), round(sparsity * row.size)) for row in layers]
    return np.stack(masks).reshape(weight.shape)


def _two_of_four(weight: np.ndarray, contracted: tuple[int, ...]) -> np.ndarray:
    """Keeps the 2 largest |w| of each 4 consecutive input channels (the contracted axes, flattened
    in order), for every output channel and layer."""
    lead = contracted[0]  # 0, or 1 under a scanned stack's layer axis
    n_in = math.prod(weight.shape[a] for a in contracted)
    if n_in % 4:
        raise ConfigError(f"--structure 2:4 needs input sizes that are multiples of 4; a kernel of shape "
                          f"{weight.shape} has {n_in} inputs")
    outer, inner = weight.shape[:lead], weight.shape[lead + len(contracted):]
    w = np.abs(weight).reshape(math.prod(outer), n_in, math.prod(inner))
    groups_OGI4 = np.moveaxis(w.reshape(w.shape[0], n_in // 4, 4, w.shape[2]), 2, 3)
    # Rank within each group, largest first; a stable sort of -|w| puts the earlier of two equals first.
    order = np.argsort(-groups_OGI4, axis=-1, kind="stable")
    keep = np.zeros(groups_OGI4.shape, bool)
    np.put_along_axis(keep, order[..., :2], True, axis=-1)
    return np.moveaxis(keep, 3, 2).reshape(weight.shape)


def prune_params(params: Any, config: ModelConfig, sparsity: float, structure: str = "unstructured",
                 scope: str = "layer") -> tuple[Any, dict[Path, np.ndarray]]:
    """(pruned params, masks by path). Params come back as numpy arrays, pruned weights exactly zero."""
    check_options(sparsity, structure, scope)
    chosen = prunable(config)
    flat = {path: np.asarray(jax.device_get(leaf)) for path, leaf in _flat(params).items()}
    masks: dict[Path, np.ndarray] = {}
    if structure == "2:4":
        masks = {path: _two_of_four(flat[path], chosen[path][0]) for path in chosen}
    elif scope == "layer":
        masks = {path: _unstructured_layer(flat[path], sparsity, stacked) for path, (_, stacked) in chosen.items()}
    else:
        paths = sorted(chosen)
        magnitude = np.concatenate([np.abs(flat[p]).reshape(-1) for p in paths])
        keep = _smallest(magnitude, round(sparsity * magnitude.size))
        offsets = np.cumsum([0] + [flat[p].size for p in paths])
        masks = {p: keep[offsets[i]:offsets[i + 1]].reshape(flat[p].shape) for i, p in enumerate(paths)}
    pruned = {path: np.where(masks[path], leaf, np.zeros((), leaf.dtype)) if path in masks else leaf
              for path, leaf in flat.items()}
    return _nested(pruned), masks


def sparsity_of(masks: dict[Path, np.ndarray]) -> dict[str, Any]:
    """Zeros over all pruned weights, and per kernel, for the export's report."""
    zeros = sum(int(m.size - m.sum()) for m in masks.values())
    total = sum(int(m.size) for m in masks.values())
    return {"zeros": zeros, "pruned_weights": total, "sparsity": zeros / max(total, 1)}


def _flat(tree: Any) -> dict[Path, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf for path, leaf in leaves}


def _nested(flat: dict[Path, Any]) -> dict[str, Any]:
    """{('a', 'b'): x} -> {'a': {'b': x}}: the layout of a Flax parameter tree, and of the saved mask."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return tree


def nested_masks(masks: dict[Path, np.ndarray]) -> dict[str, Any]:
    return _nested(masks)
