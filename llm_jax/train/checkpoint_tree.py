"""A checkpoint's state tree next to the tree a config expects: compare, then restore across layouts.

The checkpoint's own metadata (leaf names, shapes, dtypes) is compared with the config's abstract
state before anything is restored, so a config that does not fit is a one-line config error and is
never taken for damaged files. Settings that leave the tree unchanged (remat, attention, compute
dtype, mesh) need nothing here. One that changes the tree but not the values is converted:
stacked layers (`model.scan_layers`: one subtree `layers` whose leaves have a leading [n_layers]
axis) and unrolled ones (`layer_0`, `layer_1`, ...) hold the same numbers, in the parameters and in
every optimizer moment alike.

Leaves are keyed by their path as a tuple of plain strings, e.g. ('opt_state', '1', '0', 'mu',
'embed', 'embedding'): the checkpoint stores namedtuples as dicts and tuples as lists, so only the
names and indices are comparable.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Path = tuple[str, ...]
Spec = tuple[tuple[int, ...], str]  # (shape, dtype name)

STACKED = "layers"  # the scanned subtree (models/decoder.py)
_UNROLLED = re.compile(r"layer_(\d+)")  # one unrolled layer


def flat(tree: Any) -> dict[Path, Any]:
    """The leaves of `tree` by path; empty states (None, EmptyState) have none."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def specs(leaves: dict[Path, Any]) -> dict[Path, Spec]:
    """Shape and dtype of each leaf (ShapeDtypeStructs, arrays or orbax's ArrayMetadata)."""
    return {path: (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in leaves.items()}


def _layer_of(path: Path) -> tuple[Path, int | None]:
    """('params', 'layer_3', 'mlp', ...) -> (('params', 'layers', 'mlp', ...), 3); other paths: (path, None)."""
    for i, name in enumerate(path):
        match = _UNROLLED.fullmatch(name)
        if match:
            return path[:i] + (STACKED,) + path[i + 1:], int(match.group(1))
    return path, None


def _unrolled(path: Path, layer: int) -> Path:
    i = path.index(STACKED)
    return path[:i] + (f"layer_{layer}",) + path[i + 1:]


def stacked_view(tree_specs: dict[Path, Spec]) -> dict[Path, Spec]:
    """The tree as `scan_layers=true` lays it out: each set of per-layer leaves as one stacked leaf.

    Layers with gaps or of unequal shapes are left as they are, so that a comparison names them.
    """
    out: dict[Path, Spec] = {}
    groups: dict[Path, dict[int, tuple[Path, Spec]]] = defaultdict(dict)
    for path, spec in tree_specs.items():
        stacked, layer = _layer_of(path)
        if layer is None:
            out[path] = spec
        else:
            groups[stacked][layer] = (path, spec)
    for stacked, layers in groups.items():
        layer_specs = {spec for _, spec in layers.values()}
        if sorted(layers) == list(range(len(layers))) and len(layer_specs) == 1:
            shape, dtype = layer_specs.pop()
            out[stacked] = ((len(layers), *shape), dtype)
        else:
            out.update(dict(layers.values()))
    return out


def difference(saved: dict[Path, Spec], expected: dict[Path, Spec]) -> str | None:
    """None when a checkpoint of tree `saved` restores into `expected` (perhaps converting layers);
    otherwise a phrase naming the first difference, parameters before optimizer state."""
    if saved == expected or stacked_view(saved) == stacked_view(expected):
        return None
    if _has_unrolled(saved) != _has_unrolled(expected):  # one side scanned: compare as both would be
        saved, expected = stacked_view(saved), stacked_view(expected)
    for path in sorted(set(saved) | set(expected), key=lambda p: (p[0] != "params", p)):
        if path not in expected:
            prefix, count = _absent_subtree(path, saved, expected)
            return f"the checkpoint has {_name(prefix)} ({_arrays(count)}) that this config does not"
        if path not in saved:
            prefix, count = _absent_subtree(path, expected, saved)
            return f"this config has {_name(prefix)} ({_arrays(count)}) that the checkpoint does not"
        if saved[path] != expected[path]:
            return (f"{_name(path)} is {_format(saved[path])} in the checkpoint, "
                    f"{_format(expected[path])} in this config")
    return None  # not reached: the trees differ somewhere


def _has_unrolled(tree_specs: dict[Path, Spec]) -> bool:
    return any(_layer_of(path)[1] is not None for path in tree_specs)


def _absent_subtree(path: Path, present: dict[Path, Spec], other: dict[Path, Spec]) -> tuple[Path, int]:
    """The shortest prefix of `path` that `other` has nothing under, and how many leaves it holds."""
    for n in range(1, len(path) + 1):
        prefix = path[:n]
        if not any(p[:n] == prefix for p in other):
            return prefix, sum(p[:n] == prefix for p in present)
    return path, 1


def _arrays(count: int) -> str:
    return "1 array" if count == 1 else f"{count} arrays"


def _name(path: Path) -> str:
    return "/".join(path)


def _format(spec: Spec) -> str:
    shape, dtype = spec
    return f"{dtype}[{','.join(map(str, shape))}]"


# ----------------------------------------------------------------------------- restoring across layouts


def restore_target(saved_tree: Any, abstract_state: Any) -> Any:
    """ShapeDtypeStructs in the checkpoint's own layout (`saved_tree`, its metadata tree), each placed
    as the matching leaf of `abstract_state` will be: a per-layer leaf as one slice of the stacked one,
    a stacked leaf as all the per-layer ones side by side."""
    expected = flat(abstract_state)

    def target(path, leaf):
        path = tuple(_key_name(k) for k in path)
        stacked, layer = _layer_of(path)
        if path in expected:
            sharding = expected[path].sharding
        elif layer is not None:  # per-layer in the checkpoint, stacked in the config
            sharding = _drop_leading_axis(expected[stacked].sharding)
        else:  # stacked in the checkpoint, per-layer in the config
            sharding = _add_leading_axis(expected[_unrolled(path, 0)].sharding)
        return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(target, saved_tree)


def to_expected_layout(restored: Any, abstract_state: Any) -> Any:
    """The restored tree (checkpoint layout) as a tree like `abstract_state`, on its shardings.

    One compiled copy: for that moment both layouts are in device memory (about twice the state).
    """
    values = flat(restored)
    expected = flat(abstract_state)
    paths = list(expected)

    def convert(values):
        out = []
        for path in paths:
            stacked, layer = _layer_of(path)
            if path in values:
                out.append(values[path])
            elif layer is not None:  # stacked in the checkpoint: this layer's slice
                out.append(values[stacked][layer])
            else:  # unrolled in the checkpoint: stack the layers in order
                out.append(jnp.stack([values[_unrolled(path, i)] for i in range(expected[path].shape[0])]))
        return out

    leaves = jax.jit(convert, out_shardings=[expected[p].sharding for p in paths])(values)
    return jax.tree.unflatten(jax.tree.structure(abstract_state), leaves)


def _drop_leading_axis(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return sharding  # single-device or replicated: fits any shape


def _add_leading_axis(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    return sharding
