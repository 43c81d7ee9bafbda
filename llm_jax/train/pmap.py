"""Classic replicated data parallelism: `jax.pmap` over every device, gradients summed across them.

The same `train_step` as the sharded path runs on each device with its share of the batch; the
`axis_name` makes it add loss and gradient sums over devices before the single division, so an
update equals that of the whole batch on one device.

Layouts: inside the loop the state is "stacked" (a leading axis with one replica per device, the
layout pmap takes and returns). Everywhere else (checkpoints, eval, sampling) it is the global
layout: one array replicated over the mesh, like the sharded path's. `to_stacked`/`to_global`
move between the two without going through the host.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.train.steps import train_step

AXIS = "devices"  # the pmap axis name the step reduces over


def stacked_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over every device of the mesh (all devices sit on its data axis)."""
    return NamedSharding(mesh, P(mesh.axis_names))


def to_stacked(tree: Any, mesh: Mesh) -> Any:
    """Global replicated arrays -> [n_devices, ...] arrays holding one replica per device."""
    sharding = stacked_sharding(mesh)

    def stack(x: jax.Array) -> jax.Array:
        shards = [s.data[None] for s in x.addressable_shards]
        return jax.make_array_from_single_device_arrays((mesh.size, *x.shape), sharding, shards)

    return jax.tree.map(stack, tree)


def to_global(tree: Any, mesh: Mesh) -> Any:
    """[n_devices, ...] replicas -> one global array replicated over the mesh (replica of each device)."""
    sharding = NamedSharding(mesh, P())

    def unstack(x: jax.Array) -> jax.Array:
        shards = [s.data.reshape(x.shape[1:]) for s in x.addressable_shards]
        return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, shards)

    return jax.tree.map(unstack, tree)


def first_replica(tree: Any) -> Any:
    """One local device's copy of each replicated leaf: enough for host-side metrics."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data.reshape(x.shape[1:]), tree)


def put_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows [b, L] -> global [n_devices, b_per_device, L], each device its own rows. Key
    by key: an encoder-decoder's encoder side (seq_len) and decoder side (target_len) differ in L."""
    n_local = len(mesh.local_devices)
    sharding = stacked_sharding(mesh)

    def put(x: np.ndarray) -> jax.Array:
        per_device = x.reshape((n_local, x.shape[0] // n_local) + x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, per_device)

    return {k: put(v) for k, v in local_batch.items()}


def compile_train_step(model, tx, schedule, *, grad_accum: int, use_dropout: bool, mesh: Mesh, loss_fn=None):
    """(stacked state, stacked batch) -> (stacked state, host-ready metrics of one replica).
    `loss_fn`: as train_step's (None: the language-model loss)."""
    step = jax.pmap(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule, grad_accum=grad_accum,
                          use_dropout=use_dropout, axis_name=AXIS, loss_fn=loss_fn),
        axis_name=AXIS,
        devices=list(mesh.devices.flat),
        donate_argnums=0,
    )

    def train_fn(state, batch):
        state, metrics = step(state, batch)
        return state, first_replica(metrics)

    return train_fn
