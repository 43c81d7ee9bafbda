"""Where the time of one training step goes: a jax.profiler trace, summed per XLA op and per model part.

Compiles the train step of CONFIG exactly as `llm-jax bench` does, runs `--steps` steps under
`jax.profiler.trace`, and reads the trace back: every XLA:CPU thunk (or GPU kernel launch named
after its HLO instruction) is matched with the instruction in the compiled HLO, whose metadata
names the JAX code it came from (e.g. `transpose(jvp(Transformer))/layer_3/mlp/fc/dot_general`).
Prints the time per phase (forward, backward, optimizer) and model part, then the top ops.

    python scripts/profile_step.py configs/baby_gpt.yaml --steps 3

Op times are summed over all threads: XLA:CPU may run independent ops side by side, so the sum
can exceed the wall time of the step, which is printed too. The trace (TensorBoard/Perfetto
format) is kept in --trace-dir for a closer look.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import time
from pathlib import Path

import jax

from llm_jax.commands import bench
from llm_jax.config import load_config
from llm_jax.kernels import host_memory

# `%name = f32[2,3]{1,0} opcode(...)`, `ROOT %name = (f32[], s32[]) tuple(...)`
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (opcode, JAX op_name metadata) for every instruction of the compiled module."""
    table = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            op_name = _OP_NAME.search(line)
            opcode = match.group(2)
            if opcode == "fusion" and "__ynn_fusion" in line:
                opcode = "ynn_fusion"  # a YNNPACK matmul (with fused element-wise work)
            table[match.group(1)] = (opcode, op_name.group(1) if op_name else "")
    return table


def phase_of(op_name: str) -> str:
    if "transpose(jvp" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "optimizer+rest"


def part_of(op_name: str) -> str:
    """The model part an op belongs to, from the Flax module path in its metadata."""
    path = op_name.split("/")
    rules = [
        ("attn/query", "attn q/k/v/out proj"), ("attn/key", "attn q/k/v/out proj"),
        ("attn/value", "attn q/k/v/out proj"), ("attn/out", "attn q/k/v/out proj"),
        ("attn/", "attention core (scores, softmax, values)"),
        ("mlp/", "mlp"), ("norm", "layer norms"), ("embed.attend", "logits matmul (tied embedding)"),
        ("pos_embed", "embedding lookups"), ("embed", "embedding lookups"),
    ]
    for needle, part in rules:
        if needle in op_name:
            return part
    if any(p.startswith(("jvp()", "transpose(jvp())")) for p in path):
        return "loss (softmax cross-entropy)"
    if "Transformer" in op_name:
        return "model, other (residual adds, ...)"
    return "optimizer, clipping, guards, other"


def read_trace_events(trace_dir: Path) -> list[dict]:
    traces = sorted(trace_dir.glob("**/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    data = json.load(gzip.open(traces[-1]))
    return data["traceEvents"] if isinstance(data, dict) else data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rest", nargs="*", metavar="[CONFIG] key=value")
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--top", type=int, default=25, help="ops listed individually")
    parser.add_argument("--trace-dir", default="/tmp/llm_jax_profile")
    args = parser.parse_args()
    host_memory.tune_malloc_for_xla_cpu()  # as `llm-jax bench` does, before JAX starts its threads
    config_path = args.rest[0] if args.rest and "=" not in args.rest[0] else None
    overrides = [a for a in args.rest if a != config_path]
    config = load_config(config_path, ["workdir=/tmp/llm_jax_profile/run", *overrides])

    setup, compiled, state, batch, _ = bench.compile_train_step(config)
    with setup.context():
        for _ in range(2):  # warm-up: first-call allocations stay out of the trace
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        wall = []
        with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
                wall.append(time.perf_counter() - t0)

    instructions = hlo_instructions(compiled.as_text())
    per_op: collections.Counter = collections.Counter()
    for event in read_trace_events(Path(args.trace_dir)):
        if event.get("ph") == "X" and event.get("name") in instructions:
            per_op[event["name"]] += event.get("dur", 0) / 1e6 / args.steps  # seconds per step
    total = sum(per_op.values())
    if not total:
        raise SystemExit("no XLA ops found in the trace (is this backend's profiler naming ops by HLO name?)")

    by_part: collections.Counter = collections.Counter()
    for name, seconds in per_op.items():
        opcode, op_name = instructions[name]
        by_part[(phase_of(op_name), part_of(op_name))] += seconds
    print(f"config: {config_path} {' '.join(overrides)}; device {jax.devices()[0].device_kind}")
    print(f"step wall time (traced, median of {args.steps}): {statistics.median(wall):.3f} s; "
          f"op time summed over threads: {total:.3f} s\n")
    print(f"{'phase':15s} {'part':45s} {'s/step':>8s} {'share':>7s}")
    for (phase, part), seconds in sorted(by_part.items(), key=lambda kv: -kv[1]):
        print(f"{phase:15s} {part:45s} {seconds:8.4f} {seconds / total:7.1%}")
    by_phase: collections.Counter = collections.Counter()
    by_opcode: collections.Counter = collections.Counter()
    for name, seconds in per_op.items():
        opcode, op_name = instructions[name]
        by_phase[phase_of(op_name)] += seconds
        by_opcode["matmul (dot / ynn_fusion)" if opcode in ("dot", "ynn_fusion") else opcode] += seconds
    print("\n" + ", ".join(f"{phase} {s / total:.1%}" for phase, s in by_phase.most_common()))
    print(", ".join(f"{op} {s / total:.1%}" for op, s in by_opcode.most_common(8)))
    print(f"\ntop {args.top} ops:")
    for name, seconds in per_op.most_common(args.top):
        opcode, op_name = instructions[name]
        where = op_name.removeprefix("jit(train_step)/")
        print(f"{seconds:8.4f} s {seconds / total:6.1%}  {name:32s} {opcode:12s} {where}")


if __name__ == "__main__":
    main()
