"""Saves a train state sharded fsdp=8 over 8 fake CPU devices, restores it onto other meshes and
device counts, and prints one JSON object comparing every restored value with the saved one.

Started by test_fault_tolerance.py in a fresh process, because the fake device count must be set
before JAX starts: python tests/elastic_restore.py DIR  (XLA_FLAGS=--xla_force_host_platform_device_count=8)
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

from llm_jax.commands import bench
from llm_jax.config import load_config
from llm_jax.parallel import mesh as mesh_lib
from llm_jax.train import checkpoint, loop

SOURCE = (dict(data=1, fsdp=8, tensor=1), 8)
TARGETS = {  # name: (mesh axes, device count)
    "fsdp4": (dict(data=1, fsdp=4, tensor=1), 4),
    "single": (dict(data=1, fsdp=1, tensor=1), 1),
    "data8": (dict(data=8, fsdp=1, tensor=1), 8),
}
TRAINED_STEPS = 2  # so that the optimizer moments are not zeros


def _setup(mesh_axes: dict, n_devices: int):
    config = load_config("configs/tiny.yaml", [
        "train.batch_size=8", "train.seq_len=32", "optimizer.lr=1e-2", "optimizer.warmup_steps=0",
        *[f"mesh.{k}={v}" for k, v in mesh_axes.items()]])
    devices = jax.devices()[:n_devices]
    return loop.build(config, mesh=mesh_lib.make_mesh(config, devices), with_data=False)


def _next_loss(setup, state, steps=None) -> float:
    """The loss of one more step from `state`: a restored state must train on like the saved one."""
    steps = steps or loop.compile_steps(setup)
    with setup.context():
        batch = bench.synthetic_batch(setup.config, seed=TRAINED_STEPS)
        _, metrics = steps.train(steps.to_loop(state), steps.put_batch(batch))
        return float(metrics["loss"])


def main(directory: Path) -> dict:
    source = _setup(*SOURCE)
    state = loop.create_state(source)
    steps = loop.compile_steps(source)
    with source.context():
        for step in range(TRAINED_STEPS):
            state, _ = steps.train(state, steps.put_batch(bench.synthetic_batch(source.config, seed=step)))
    saver = checkpoint.Checkpointer(directory, source.config.checkpoint)
    saver.save(TRAINED_STEPS, state, None, {"step": TRAINED_STEPS})
    saver.close()
    saved = jax.device_get(state)
    report = {"source": {"param_bytes_per_device": mesh_lib.bytes_per_device(state.params),
                         "next_loss": _next_loss(source, state, steps)}}

    for name, (mesh_axes, n_devices) in TARGETS.items():
        target = _setup(mesh_axes, n_devices)
        reader = checkpoint.Checkpointer(directory, target.config.checkpoint, read_only=True)
        restored, metadata = reader.restore(TRAINED_STEPS, target.abstract_state, None)
        reader.close()
        pairs = list(zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(restored))))
        report[name] = {
            "leaves": len(pairs),
            "identical": all(np.array_equal(a, b) for a, b in pairs),
            "max_abs_diff": max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) for a, b in pairs),
            "devices": len({d for x in jax.tree.leaves(restored) for d in x.sharding.device_set}),
            "param_bytes_per_device": mesh_lib.bytes_per_device(restored.params),
            "step": int(metadata["step"]),
        }
        if name == "single":  # one more compile is enough to show that training goes on
            report[name]["next_loss"] = _next_loss(target, restored)
    report["param_bytes_total"] = sum(x.nbytes for x in jax.tree.leaves(saved.params))
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]).absolute())))
