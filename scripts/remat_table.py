"""Rematerialisation policies side by side: memory of the compiled train step and its step time.

For `model.remat` none, full and dots, with `model.scan_layers` on and off, it runs `llm-jax bench`
(in this process) on one config and prints XLA's temporary memory per device (mostly activations
kept for the backward pass), the step's peak memory, and the median step time. The default config
is the baby GPT at 1024 tokens per row, where activations outweigh the weights; any config and
overrides can be given instead.

    python scripts/remat_table.py                                   # baby GPT, seq 1024, batch 8
    python scripts/remat_table.py configs/llama_1b.yaml model.n_layers=4 --steps 3

On GPU/TPU `peak_memory_bytes` is the allocator's peak for the whole process; `temp_memory_bytes`
(XLA's plan for the step) is the figure to compare between policies.
"""

from __future__ import annotations

import argparse
import json

from llm_jax.commands.bench import run_bench
from llm_jax.config import load_config
from llm_jax.kernels import host_memory

LONG_BABY_GPT = ["train.seq_len=1024", "model.max_len=1024", "train.batch_size=8"]


def mib(n_bytes: int | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rest", nargs="*", metavar="[CONFIG] key=value")
    parser.add_argument("--policies", nargs="+", default=["none", "full", "dots"])
    parser.add_argument("--scan", nargs="+", default=["true", "false"], choices=["true", "false"],
                        help="model.scan_layers settings to try (remat saves memory only with scan on XLA:CPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per policy (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    host_memory.tune_malloc_for_xla_cpu()  # as `llm-jax bench` does, before JAX starts its threads
    if args.rest and "=" not in args.rest[0]:
        config_path, overrides = args.rest[0], args.rest[1:]
    else:
        config_path, overrides = "configs/baby_gpt.yaml", [*LONG_BABY_GPT, *args.rest]
    overrides = ["workdir=/tmp/llm_jax_remat_table", *overrides]

    rows = []
    print(f"config: {config_path} {' '.join(overrides[1:])}")
    print(f"{'scan':5s} {'remat':6s} {'temp MiB':>9s} {'peak MiB':>9s} {'step s':>7s} {'tokens/s':>9s} "
          f"{'compile s':>9s}", flush=True)
    for scan in args.scan:
        for policy in args.policies:
            config = load_config(config_path, [*overrides, f"model.remat={policy}", f"model.scan_layers={scan}"])
            report = run_bench(config, steps=args.steps, warmup=args.warmup)
            row = {"scan_layers": scan == "true", "remat": policy,
                   **{k: report[k] for k in ("temp_memory_bytes", "peak_memory_bytes", "step_time_s", "tokens_per_sec",
                                             "compile_time_s")}}
            rows.append(row)
            print(f"{scan:5s} {policy:6s} {mib(row['temp_memory_bytes']):>9s} {mib(row['peak_memory_bytes']):>9s} "
                  f"{row['step_time_s']:7.3f} {row['tokens_per_sec']:9.0f} {row['compile_time_s']:9.1f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
