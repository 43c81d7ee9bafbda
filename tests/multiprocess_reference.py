"""One process, all devices, fed the global batches that a P-process run assembles: the reference
trajectory that a multi-process run must follow step by step.

Each process of a P-process run reads its own slice of the data (process p of P); the global batch
is the union of their rows. This script builds the same union in one process and runs the same
train step on it. Usage (with XLA_FLAGS setting the device count):
    python tests/multiprocess_reference.py NUM_PROCESSES STEPS CONFIG key=value ...
Prints one JSON list: the loss of every step.
"""

import json
import sys

import jax
import numpy as np

from llm_jax.config import load_config
from llm_jax.data import pipeline as data_lib
from llm_jax.train import loop


def reference_losses(num_processes: int, steps: int, config_path: str, overrides: list[str]) -> list[float]:
    config = load_config(config_path, overrides)
    setup = loop.build(config)
    iterators = [data_lib.make_train_iterator(config, setup.tokenizer, setup.sources, p, num_processes)
                 for p in range(num_processes)]
    compiled = loop.compile_steps(setup)
    state = compiled.to_loop(loop.create_state(setup))
    losses = []
    with setup.context():
        for _ in range(steps):
            slices = [next(it) for it in iterators]
            batch = {k: np.concatenate([s[k] for s in slices]) for k in slices[0]}
            state, metrics = compiled.train(state, compiled.put_batch(batch))
            losses.append(float(jax.device_get(metrics["loss"])))
    return losses


if __name__ == "__main__":
    print(json.dumps(reference_losses(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])))
