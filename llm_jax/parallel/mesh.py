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
    shape = validate_for_devices(config, len(devices), jax.process_count())
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


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Builds global arrays from this process's rows; every process passes its own slice."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def bytes_per_device(tree: Any) -> int:
    """Bytes that the most loaded device holds for a tree of (possibly sharded) arrays."""
    totals: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values(), default=0)
