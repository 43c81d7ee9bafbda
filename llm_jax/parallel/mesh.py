"""Device mesh, logical-axis rules and global arrays.

The model names its axes logically ("embed", "heads", ...); the config maps those names to mesh
axes ("data", "fsdp", "tensor"). This module is the only place where the two meet.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.config import Config, validate_for_devices

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # a batch is split over both: FSDP is data parallel for activations


def make_mesh(config: Config, devices: list | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices of all processes.

    Axes are `Auto`: Linen modules rely on sharding propagation, not explicit sharding types.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = validate_for_devices(config, len(devices))
    if config.parallel.mode == "pmap":  # pmap maps over devices in their plain order
        device_grid = np.asarray(devices, dtype=object).reshape(shape)
    else:
        device_grid = _device_grid(devices, shape)
    return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _device_grid(devices: list, shape: tuple[int, int, int]) -> np.ndarray:
    """Lays devices out so the innermost (tensor) axis stays within a host or an ICI ring."""
    try:
        from jax.experimental import mesh_utils

        if len(devices) == len(jax.devices()):
            return mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        pass
    return np.asarray(devices, dtype=object).reshape(shape)


def axis_rules(config: Config) -> tuple[tuple[str, Any], ...]:
    """The config's logical -> mesh axis rules; under pmap every logical axis is replicated."""
    if config.parallel.mode == "pmap":
        return tuple((name, None) for name, _ in config.mesh.axis_rules)
    return tuple(config.mesh.axis_rules)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of `nn.Partitioned` boxes (e.g. from `jax.eval_shape(init)`).

    Specs must come from the boxed tree: after unboxing every leaf would silently replicate.
    Leaves that are not boxed (optimizer counters, the step) are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, length] arrays: batch split over data x fsdp, length whole."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _row_span(index: tuple, batch_size: int) -> tuple[int, int]:
    rows = index[0]
    return rows.start or 0, batch_size if rows.stop is None else rows.stop


def host_rows(sharding: NamedSharding, batch_size: int) -> list[tuple[int, int]]:
    """The global rows [start, stop) that this process's devices hold of a [batch_size, ...] array
    with `sharding`, sorted and merged. Devices that hold the same rows (a tensor axis, or one
    spanning processes) count once; the ranges need not be contiguous.
    """
    spans = sorted(_row_span(index, batch_size)
                   for index in sharding.addressable_devices_indices_map((batch_size, 1)).values())
    merged: list[tuple[int, int]] = []
    for start, stop in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
        else:
            merged.append((start, stop))
    return merged


def batch_rows(mesh: Mesh, batch_size: int) -> list[tuple[int, int]]:
    """The global batch rows this process must load: those its devices hold under `batch_sharding`.

    Under pmap the mesh lists the devices in their plain order, so device i holds block i of the
    batch in both layouts and these are the rows `train/pmap.put_batch` places too.
    """
    return host_rows(batch_sharding(mesh), batch_size)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> dict[str, jax.Array]:
    """Global [batch_size, ...] arrays from this process's rows: `host_rows(sharding, batch_size)`,
    concatenated in order. Each device gets exactly its rows, whatever the mesh and process layout."""
    spans = host_rows(sharding, batch_size)
    offsets, offset = [], 0
    for start, stop in spans:
        offsets.append(offset)
        offset += stop - start

    def local_rows(x: np.ndarray, index: tuple) -> np.ndarray:
        start, stop = _row_span(index, batch_size)
        i = max(i for i, span in enumerate(spans) if span[0] <= start)  # the range that holds these rows
        at = offsets[i] + start - spans[i][0]
        return x[at:at + stop - start]

    def put(x: np.ndarray) -> jax.Array:
        if x.shape[0] != offset:
            raise ValueError(f"this process holds {offset} rows of the batch ({spans}), got {x.shape[0]}")
        return jax.make_array_from_callback((batch_size, *x.shape[1:]), sharding, lambda index: local_rows(x, index))

    return {k: put(v) for k, v in local_batch.items()}


def bytes_per_device(tree: Any) -> int:
    """Bytes that the most loaded device holds for a tree of (possibly sharded) arrays."""
    totals: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values(), default=0)
