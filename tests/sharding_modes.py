"""Runs 12 train steps of a tiny model in several mesh layouts; prints the loss trajectories (and, for the
fine-tuning tasks, the held-out metrics after them).

Started by test_sharding.py in a fresh process, because the fake device count must be set before
JAX starts: python tests/sharding_modes.py [[ARCH-]MODE ...]  (with XLA_FLAGS=--xla_force_host_platform_device_count=8);
no MODE runs them all. Each mode compiles its own programs, so the test runs the modes in two processes
side by side, each on its own 8 fake devices.
"""

import dataclasses
import json
import sys
import tempfile
import types
from pathlib import Path

import jax
import numpy as np

from llm_jax.commands import bench
from llm_jax.config import load_config
from llm_jax.data import labelled, task_batches
from llm_jax.parallel import mesh as mesh_lib
from llm_jax.train import loop, tasks

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
SOURCES = {"classify": "jsonl", "tag": "conll"}  # named for the config's checks; nothing is read
TASKS = {"classify": ("neg", "neutral", "pos"), "tag": ("B-LOC", "B-PER", "I-LOC", "I-PER", "O")}


def _train(setup, batch_of_step):
    """STEPS steps from a fresh state: (the compiled steps, the final state in its global layout, the losses)."""
    state = loop.create_state(setup)
    steps = loop.compile_steps(setup)
    state = steps.to_loop(state)
    losses = []
    with setup.context():
        for step in range(STEPS):
            state, metrics = steps.train(state, steps.put_batch(batch_of_step(step)))
            losses.append(float(metrics["loss"]))
    return steps, steps.to_global(state), losses


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


def _task_batch(kind: str, seed: int, examples: int, batch_size: int, seq_len: int, vocab: int) -> dict:
    """A fine-tuning batch built by the trainer's own row code (task_batches.pad_row): `examples` rows of
    random lengths, the rest padding rows (label -1). Labels are a function of the tokens (classify: the
    second token's; tag: each word's first piece's), so 12 steps on two batches learn them."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(batch_size):
        if i >= examples:
            rows.append(task_batches.pad_row(None, kind, seq_len))
            continue
        n = int(rng.integers(4, seq_len + 1))
        inputs = rng.integers(4, vocab, size=n, dtype=np.int32)
        if kind == "classify":
            features = {"inputs": inputs, "token_types": (np.arange(n) >= n // 2).astype(np.int32),
                        "label": int(inputs[1]) % len(TASKS[kind])}
        else:  # words of one or two pieces; [CLS] and [SEP] (first and last) have no word
            first = np.r_[False, rng.random(n - 2) < 0.6, False]
            first[1] = True
            word_index = np.where(np.r_[False, np.ones(n - 2, bool), False], np.cumsum(first) - 1, -1)
            features = {"inputs": inputs, "labels": np.where(first, inputs % len(TASKS[kind]), -1).astype(np.int32),
                        "word_index": word_index.astype(np.int32)}
        rows.append(task_batches.pad_row(features, kind, seq_len))
    return task_batches.stack_rows(rows)


def run_task(kind: str, layout: str) -> dict:
    """A bert fine-tuned for `kind` (classify | tag) in a mesh layout: 12 steps on two batches, then the
    task's eval (tasks.evaluate_task, the trainer's) over three held-out batches, the last a part
    batch padded with label -1 rows, which must count nothing."""
    mode = MODES[layout]
    parallel = "pmap" if layout in PMAP_MODES else "jit"
    workdir = Path(tempfile.mkdtemp())
    labels = labelled.LabelSet(kind, TASKS[kind])
    labelled.save_labels(labels, tasks.labels_path(workdir))  # a run's labels.json: built without data
    config = load_config("configs/tiny.yaml", [f"workdir={workdir}", f"parallel.mode={parallel}", "model.arch=bert",
        f"task.kind={kind}", f"data.source={SOURCES[kind]}", f"data.path={workdir}/unread", "task.pooling=mean",
        "model.n_layers=1", "model.n_heads=8", "model.d_model=64",
        "train.batch_size=8", "train.seq_len=16", "optimizer.lr=1e-2", "optimizer.warmup_steps=2",
        f"train.steps={STEPS}", *[f"mesh.{k}={v}" for k, v in mode.items()]])
    devices = jax.devices()[:1] if mode == MODES["single"] else jax.devices()
    setup = loop.build(config, mesh=mesh_lib.make_mesh(config, devices), with_data=False)
    setup = dataclasses.replace(setup, sources=types.SimpleNamespace(labels=labels))  # what eval reads of the data
    shape = dict(batch_size=8, seq_len=16, vocab=config.model.vocab_size)
    train_batches = [task_batches.device_part(_task_batch(kind, seed, 8, **shape)) for seed in (0, 1)]
    held_out = [task_batches.device_part(_task_batch(kind, seed, examples, **shape))
                for seed, examples in ((0, 8), (2, 8), (3, 5))]
    steps, state, losses = _train(setup, lambda step: train_batches[step % 2])
    scores = tasks.evaluate_task(setup, steps.eval, state.params, held_out)
    counted = {"weight": 0.0, "labelled": 0.0}  # what the eval step counts: each labelled row or word once
    with setup.context():
        for local in held_out:
            out = jax.device_get(steps.eval(state.params, steps_batch(setup, local)))
            counted["weight"] += float(out["weight"])
            counted["labelled"] += float(out["confusion"].sum() if kind == "classify" else (out["labels"] >= 0).sum())
    expected = sum(float((b["labels"] >= 0).sum()) for b in held_out)
    return {"losses": losses, "eval": scores, "counted": counted, "expected": expected,
            "finite": bool(np.isfinite(losses).all())}


def steps_batch(setup, local: dict) -> dict:
    """A held-out batch as the eval step takes it (global arrays sharded over the batch axes, as evaluate puts it)."""
    return mesh_lib.global_batch(local, mesh_lib.batch_sharding(setup.mesh), setup.config.train.batch_size)


def run(name: str) -> dict:
    """`name`: a mode of MODES (gpt2), or an arch and a mode: `bert-fsdp8` the same layout for the encoder,
    `t5-fsdp8` for the encoder-decoder (span corruption's batches: both sides, every target weighted);
    `classify-fsdp8` and `tag-fsdp8` a bert fine-tuned for the task (run_task)."""
    arch, _, layout = name.rpartition("-")
    if arch in TASKS:
        return run_task(arch, layout)
    mode = MODES[layout]
    parallel = "pmap" if layout in PMAP_MODES else "jit"
    config = load_config("configs/tiny.yaml", [f"parallel.mode={parallel}", f"model.arch={arch or 'gpt2'}",
        "model.n_heads=8", "model.d_model=64", "train.batch_size=8", "train.seq_len=32", "optimizer.lr=1e-2",
        "optimizer.warmup_steps=2", f"train.steps={STEPS}", *[f"mesh.{k}={v}" for k, v in mode.items()]])
    devices = jax.devices()[:1] if mode == MODES["single"] else jax.devices()
    setup = loop.build(config, mesh=mesh_lib.make_mesh(config, devices), with_data=False)
    # Two batches, learnable in 12 steps.
    steps, state, losses = _train(setup, lambda step: bench.synthetic_batch(config, seed=step % 2))
    generates = layout in GENERATE_LAYOUTS and not config.model.family.encoder  # bert does not generate
    greedy = _greedy(setup, state.params) if generates else None
    return {"losses": losses, "greedy": greedy, "param_bytes": mesh_lib.bytes_per_device(state.params),
            "opt_bytes": mesh_lib.bytes_per_device(state.opt_state), "finite": bool(np.isfinite(losses).all())}


if __name__ == "__main__":
    names = sys.argv[1:] or list(MODES)
    print(json.dumps({name: run(name) for name in names}))
