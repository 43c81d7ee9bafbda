"""Runs 12 train steps of a tiny model in several mesh layouts; prints the loss trajectories.

Started by test_sharding.py in a fresh process, because the fake device count must be set before
JAX starts: python tests/sharding_modes.py [[ARCH-]MODE ...]  (with XLA_FLAGS=--xla_force_host_platform_device_count=8);
no MODE runs them all. Each mode compiles its own programs, so the test runs the modes in two processes
side by side, each on its own 8 fake devices.
"""

import json
import sys

import jax
import numpy as np

from llm_jax.commands import bench
from llm_jax.config import load_config
from llm_jax.parallel import mesh as mesh_lib
from llm_jax.train import loop

MODES = {
    "single": dict(data=1, fsdp=1, tensor=1),
    "data8": dict(data=8, fsdp=1, tensor=1),
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "mixed222": dict(data=2, fsdp=2, tensor=2),
    "tensor8": dict(data=1, fsdp=1, tensor=8),
    "pmap8": dict(data=8, fsdp=1, tensor=1),
}
PMAP_MODES = {"pmap8"}
GENERATE_LAYOUTS = {"single", "tensor8"}  # generation under the training mesh (test_sharding.py)
STEPS = 12


def _greedy(setup, params) -> list[list[int]]:
    """Greedy continuations of two prompts of different lengths, generated under the mode's mesh with
    its sharded trained parameters (equal in every mode to ~1e-6): tensor parallelism must not
    change a token."""
    from llm_jax.infer.generate import Decoding, generate_batch
    from llm_jax.infer.sampling import Sampling

    decoding = Decoding(max_new_tokens=6, sampling=Sampling(temperature=0.0))
    with setup.context(split_batch=False):
        results = generate_batch(setup.model, params, [[5, 17, 3, 42, 9], [7, 8]], decoding, rng=jax.random.key(0),
                                 batch_size=2)
    return [gens[0].tokens for gens in results]


def run(name: str) -> dict:
    """`name`: a mode of MODES (gpt2), or an arch and a mode: `bert-fsdp8` the same layout for the encoder,
    `t5-fsdp8` for the encoder-decoder (span corruption's batches: both sides, every target weighted)."""
    arch, _, layout = name.rpartition("-")
    mode = MODES[layout]
    parallel = "pmap" if layout in PMAP_MODES else "jit"
    config = load_config("configs/tiny.yaml", [f"parallel.mode={parallel}", f"model.arch={arch or 'gpt2'}",
        "model.n_heads=8", "model.d_model=64", "train.batch_size=8", "train.seq_len=32", "optimizer.lr=1e-2",
        "optimizer.warmup_steps=2", f"train.steps={STEPS}", *[f"mesh.{k}={v}" for k, v in mode.items()]])
    devices = jax.devices()[:1] if mode == MODES["single"] else jax.devices()
    setup = loop.build(config, mesh=mesh_lib.make_mesh(config, devices), with_data=False)
    state = loop.create_state(setup)
    steps = loop.compile_steps(setup)
    state = steps.to_loop(state)
    losses = []
    with setup.context():
        for step in range(STEPS):
            batch = bench.synthetic_batch(config, seed=step % 2)  # two batches, learnable in 12 steps
            state, metrics = steps.train(state, steps.put_batch(batch))
            losses.append(float(metrics["loss"]))
    state = steps.to_global(state)
    generates = layout in GENERATE_LAYOUTS and not config.model.family.encoder  # bert does not generate
    greedy = _greedy(setup, state.params) if generates else None
    return {"losses": losses, "greedy": greedy, "param_bytes": mesh_lib.bytes_per_device(state.params),
            "opt_bytes": mesh_lib.bytes_per_device(state.opt_state), "finite": bool(np.isfinite(losses).all())}


if __name__ == "__main__":
    names = sys.argv[1:] or list(MODES)
    print(json.dumps({name: run(name) for name in names}))
