"""`llm-jax plan`: will this model and mesh fit, per device, before a pod is rented?

The sharded train step is compiled ahead of time for the target devices without running it and
without allocating the state: on a TPU topology (compile-only devices from libtpu, real per-chip
numbers), or on the same number of fake CPU devices (the same parameter, optimizer and batch
bytes; temporaries come out several times larger than on an accelerator, so the CPU figure is
an upper bound).
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import Config, ConfigError
from llm_jax.models.build import ENCODER_KEYS
from llm_jax.runtime.faults import first_line

GIB = 1024**3

# High-bandwidth memory per device, for the "fits" verdict when none is given.
DEVICE_MEMORY = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5e": 16 * GIB,
    "TPU v5p": 95 * GIB,
    "TPU v5": 95 * GIB,
    "TPU v6 lite": 32 * GIB,  # v6e
    "TPU v6e": 32 * GIB,
    "H100": 80 * 1000**3,
    "H200": 141 * 1000**3,
    "A100": 80 * 1000**3,
}

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": GIB, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """'80GiB', '16GB', '1.5e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"--device-memory {text!r} is not a size; write e.g. 80GiB, 16GB or 1.5e9")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def topology_devices(topology: str) -> list:
    """Compile-only TPU devices of a topology such as 'v5p:4x4x4' (needs libtpu)."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # missing libtpu or an unknown name surface as many error types
        raise ConfigError(f"cannot target TPU topology {topology!r} from this host ({first_line(e)}); "
                          "install the TPU extra (pip install -e \".[tpu]\") or plan on fake CPU devices "
                          "with --devices N") from e


def cpu_devices(count: int) -> list:
    """`count` fake CPU devices: asked for before JAX starts its backends, or already there."""
    try:
        jax.config.update("jax_num_cpu_devices", max(count, 1))
    except RuntimeError:
        pass  # backends already started (e.g. inside tests): use the devices this process has
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise ConfigError(f"planning for {count} devices needs {count} CPU devices, this process has "
                          f"{len(devices)}; set XLA_FLAGS=--xla_force_host_platform_device_count={count} "
                          "before JAX starts")
    return devices[:count]


def _bytes_per_device(abstract_tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying their shardings."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
    return total


def abstract_batch(config: Config, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The train step's batch, shapes only: [batch, seq_len] arrays, and for an encoder-decoder its
    encoder side [batch, seq_len] and decoder side [batch, target_len] (data/pipeline.py)."""
    def arrays(keys: tuple[str, ...], length: int, dtype=jnp.int32) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (config.train.batch_size, length)
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) for k in keys}

    length = config.target_len if config.model.family.encoder_decoder else config.train.seq_len
    batch = {**arrays(("inputs", "targets", "segment_ids", "positions"), length),
             **arrays(("weights",), length, jnp.float32)}
    if config.model.family.encoder_decoder:
        batch.update(arrays(ENCODER_KEYS, config.train.seq_len))
    return batch


def run_plan(config: Config, devices: list, device_memory: int | None = None) -> dict[str, Any]:
    """Compiles the train step for `devices` and reports the memory of the most loaded device."""
    from llm_jax.models.decoder import count_params
    from llm_jax.parallel import mesh as mesh_lib
    from llm_jax.train import loop

    if config.parallel.mode == "pmap":
        raise ConfigError("llm-jax plan compiles the sharded step: use parallel.mode=jit "
                          "(mesh.data=-1 holds the same replicated state as pmap)")
    mesh = mesh_lib.make_mesh(config, devices)
    setup = loop.build(config, mesh=mesh, with_data=False)
    steps = loop.compile_steps(setup)
    batch = abstract_batch(config, mesh_lib.batch_sharding(mesh))
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    if device_memory is None:
        device_memory = next((size for name, size in sorted(DEVICE_MEMORY.items(), key=lambda kv: -len(kv[0]))
                              if name.lower() in kind.lower()), None)
    result = {
        "devices": f"{len(devices)}x {kind}",
        "mesh": dict(mesh.shape),
        "params": count_params(setup.abstract_state.params),
        "param_bytes": _bytes_per_device(setup.abstract_state.params),
        "optimizer_bytes": _bytes_per_device(setup.abstract_state.opt_state),
        "batch_bytes": _bytes_per_device(batch),
        "temporary_bytes": None,
        "total_bytes": None,
        "device_memory_bytes": device_memory,
        "fits": None,
        "compiler_error": None,
    }
    try:
        with setup.context():
            compiled = steps.train.lower(setup.abstract_state, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        # An accelerator compiler refuses a program that cannot fit its memory: that is the answer.
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        result.update(fits=False, compiler_error=str(e).strip().splitlines()[0])
        return result
    analysis = compiled.memory_analysis()
    # Donated state buffers are reused for the new state: outputs that alias an input add nothing.
    total = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
                + analysis.temp_size_in_bytes)
    result.update(temporary_bytes=int(analysis.temp_size_in_bytes), total_bytes=total,
                  fits=None if device_memory is None else total <= device_memory)
    return result


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_plan(plan: dict[str, Any]) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    lines = [f"{plan['params'] / 1e6:,.1f}M parameters on {plan['devices']}, mesh {mesh}", "per device:"]
    for label, key in (("parameters", "param_bytes"), ("optimizer state", "optimizer_bytes"),
                       ("batch", "batch_bytes"), ("temporaries", "temporary_bytes"), ("total", "total_bytes")):
        lines.append(f"  {label:<18}{_size(plan[key]):>12}")
    if plan["compiler_error"]:
        lines.append(f"the compiler refused the program: {plan['compiler_error']}")
    if plan["fits"] is None:
        lines.append("device memory unknown: pass --device-memory SIZE for a verdict")
    elif plan["device_memory_bytes"] is None:
        lines.append("  -> does NOT fit")
    else:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"  {'device memory':<18}{_size(plan['device_memory_bytes']):>12}  -> {verdict}")
    return "\n".join(lines)
