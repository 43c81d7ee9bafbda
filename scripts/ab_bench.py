"""A/B test of settings: `llm-jax bench` under several variants, interleaved round by round.

Each variant is one quoted argument: a name, then config overrides (`model.attention=cudnn`) and/or
environment variables (`XLA_FLAGS=--xla_cpu_...`, recognised by an upper-case name; repeat one to give
it several space-separated values). Every run is a fresh process, so XLA flags apply; the variants
take turns (A B C A B C ...), so a change in machine load hits all alike. Prints the median
tokens/s of each variant and its speed-up over the first one, by wall time and by CPU time.

    python scripts/ab_bench.py configs/baby_gpt.yaml --rounds 3 \\
        --variant "base" --variant "fused model.attention=cudnn"

JAX_PY picks the interpreter (default: this Python).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ENV_VAR = re.compile(r"^[A-Z][A-Z0-9_]*=")


def parse_variant(spec: str) -> tuple[str, list[str], dict[str, str]]:
    name, *settings = spec.split()
    overrides = [s for s in settings if not _ENV_VAR.match(s)]
    env: dict[str, str] = {}
    for setting in filter(_ENV_VAR.match, settings):  # a repeated variable collects its values: XLA_FLAGS=a XLA_FLAGS=b
        key, value = setting.split("=", 1)
        env[key] = f"{env[key]} {value}" if key in env else value
    return name, overrides, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the YAML config every variant starts from")
    parser.add_argument("--variant", action="append", required=True, help='"NAME [key=value|ENV=value ...]"')
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (median taken)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    python = os.environ.get("JAX_PY") or sys.executable
    workdir = tempfile.mkdtemp(prefix="ab_bench_")
    variants = [parse_variant(v) for v in args.variant]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", flush=True)
        for name, overrides, env in variants:
            command = [python, "-m", "llm_jax.cli", "bench", args.config, f"workdir={workdir}", *overrides,
                       "--steps", str(args.steps), "--warmup", str(args.warmup)]
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
            if result.returncode != 0:
                sys.exit(f"variant {name} failed: {' '.join(command)}\n{result.stderr[-3000:]}")
            report = json.loads(result.stdout.strip().splitlines()[-1])
            results[name].append(report)
            print(f"  {name:20s} {report['tokens_per_sec']:9.0f} tok/s  step {report['step_time_s']:.3f} s  "
                  f"cpu {report['step_cpu_time_s']:.3f} s  compile {report['compile_time_s']:.1f} s", flush=True)

    base_name = variants[0][0]
    # Speed-up over the first variant, by wall time (what a user gets) and by CPU time per step (steadier
    # when other work shares the machine; it misses gains or losses in multi-core parallelism).
    print(f"\n{'variant':20s} {'median tok/s':>12s} {'speed-up':>9s} {'cpu speed-up':>13s}   per-round speed-ups")
    summary = {}
    for name, _, _ in variants:
        rates = [r["tokens_per_sec"] for r in results[name]]
        ratios = [r / b["tokens_per_sec"] for r, b in zip(rates, results[base_name])]
        cpu_ratios = [b["step_cpu_time_s"] / r["step_cpu_time_s"] for r, b in zip(results[name], results[base_name])]
        summary[name] = {"tokens_per_sec": statistics.median(rates), "speedup": statistics.median(ratios),
                         "cpu_speedup": statistics.median(cpu_ratios)}
        print(f"{name:20s} {statistics.median(rates):12.0f} {statistics.median(ratios):9.3f} "
              f"{statistics.median(cpu_ratios):13.3f}   " + ", ".join(f"{x:.3f}" for x in ratios))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
