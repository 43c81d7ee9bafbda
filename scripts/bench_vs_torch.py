"""llm_jax against PyTorch (eager and torch.compile) on the baby GPT, BERT or T5, side by side on this machine.

Runs `llm-jax bench configs/baby_gpt.yaml` and scripts/torch_baby_gpt.py in both modes (with
`--model bert`: `llm-jax bench` with BERT_OVERRIDES and scripts/torch_baby_bert.py; with `--model t5`:
`llm-jax bench configs/t5_tiny.yaml` and scripts/torch_baby_t5.py, Hugging Face's T5 built from the
same YAML and overrides, tokens counted on both sides of a row), interleaved
round by round (jax, eager, compile, jax, eager, compile, ...) so that a change in machine load hits
all three alike, each in a fresh process. Prints every run, then a table of median tokens/s per
implementation and the ratios jax/eager and jax/compile (the median of the per-round ratios), and a
final JSON line with the same numbers. Uses only the standard library, so any Python runs it:

    python scripts/bench_vs_torch.py --rounds 3 --steps 20
    python scripts/bench_vs_torch.py --model bert --rounds 3 --steps 20
    python scripts/bench_vs_torch.py --model t5 --rounds 3 --steps 20

`--torch-tuned-malloc` adds PyTorch runs with the glibc malloc settings that `llm-jax` makes for
itself on CPU (llm_jax/kernels/host_memory.py), so the comparison can also be made on equal allocators.

Interpreters: JAX_PY (default: this Python) must have llm_jax installed; TORCH_PY (default
/tmp/torchvenv/bin/python) must have torch (and transformers for t5). Extra `key=value` arguments go
to `llm-jax bench` (e.g. model.attention=cudnn), and with `--model t5` to the PyTorch reference as
well, which applies those that shape its model (sizes, activation, tying, lengths); XLA_FLAGS and
the like pass through the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The baby BERT of scripts/torch_baby_bert.py: the baby GPT's sizes as an encoder (masked LM), llm_jax's
# default vocabulary, the position table as long as the rows (so both count the same parameters).
BERT_OVERRIDES = ["model.arch=bert", "model.n_layers=6", "model.d_model=384", "model.n_heads=6",
                  "model.d_ff=1536", "model.vocab_size=2048", "model.max_len=256", "model.dtype=float32",
                  "model.param_dtype=float32", "train.seq_len=256", "train.batch_size=16", "optimizer.lr=1e-3"]
# The baby T5: one YAML that both sides read (scripts/torch_baby_t5.py builds HF's T5 from it).
T5_CONFIG = "configs/t5_tiny.yaml"


def _default_python(env_var: str, candidate: str) -> str:
    if os.environ.get(env_var):
        return os.environ[env_var]
    return candidate if Path(candidate).exists() else sys.executable


def _last_json_line(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


# glibc's malloc settings that `llm-jax` makes for itself on CPU (llm_jax/kernels/host_memory.py), as
# environment variables, for a PyTorch run on equal terms.
TUNED_MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def run_one(name: str, command: list[str], env: dict[str, str] | None = None) -> dict:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        sys.exit(f"{name} failed (exit {result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    report = _last_json_line(result.stdout)
    print(f"  {name:27s} {report['tokens_per_sec']:9.0f} tok/s  step {report['step_time_s']:.3f} s", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["gpt", "bert", "t5"], default="gpt", help="baby GPT, BERT or T5")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (median taken)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first/compiling one")
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (slow to compile)")
    parser.add_argument("--torch-tuned-malloc", action="store_true",
                        help="also run PyTorch with the malloc settings llm-jax makes for itself on CPU")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="extra overrides for llm-jax bench")
    args = parser.parse_args()
    jax_py = _default_python("JAX_PY", sys.executable)
    torch_py = _default_python("TORCH_PY", "/tmp/torchvenv/bin/python")
    timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    workdir = tempfile.mkdtemp(prefix="bench_vs_torch_")  # bench writes nothing there; keeps runs/ clean
    model = {"gpt": ["configs/baby_gpt.yaml"], "bert": BERT_OVERRIDES, "t5": [T5_CONFIG]}[args.model]
    torch_script = [f"scripts/torch_baby_{args.model}.py"]
    if args.model == "t5":  # the T5 reference reads the same YAML and overrides, so both build one model
        if not (ROOT / T5_CONFIG).exists():
            sys.exit(f"{T5_CONFIG} is missing")
        torch_script += ["--config", T5_CONFIG, *args.overrides]
    commands = {
        "jax": [jax_py, "-m", "llm_jax.cli", "bench", *model, f"workdir={workdir}", *args.overrides, *timing],
        "torch-eager": [torch_py, *torch_script, "--mode", "eager", *timing],
    }
    if not args.skip_compile:
        commands["torch-compile"] = [torch_py, *torch_script, "--mode", "compile", *timing]
    environments = {name: None for name in commands}
    if args.torch_tuned_malloc:
        for name in [name for name in commands if name.startswith("torch")]:
            commands[f"{name}-tuned-malloc"] = commands[name]
            environments[f"{name}-tuned-malloc"] = TUNED_MALLOC_ENV
    for name, command in commands.items():
        env = " ".join(f"{k}={v}" for k, v in (environments[name] or {}).items())
        print(f"{name}: {env + ' ' if env else ''}{' '.join(command)}")

    reports: dict[str, list[dict]] = {name: [] for name in commands}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", flush=True)
        for name, command in commands.items():
            reports[name].append(run_one(name, command, environments[name]))

    params = {"jax": reports["jax"][0].get("params"), "torch": reports["torch-eager"][0]["params"]}
    print(f"\nparameters: llm_jax {params['jax']:,}, torch {params['torch']:,}"
          + ("" if params["jax"] == params["torch"] else "  <-- NOT THE SAME MODEL"))
    for key in ("seq_len", "target_len"):  # the rows' lengths, where both reports give them
        lengths = [reports[name][0].get(key) for name in ("jax", "torch-eager")]
        if None not in lengths and lengths[0] != lengths[1]:
            print(f"{key}: llm_jax {lengths[0]}, torch {lengths[1]}  <-- NOT THE SAME BATCH")
    summary = {"model": args.model, "rounds": args.rounds, "steps": args.steps, "params": params,
               "jax_device": reports["jax"][0].get("device"), "jax_mfu": [r["mfu"] for r in reports["jax"]]}
    print(f"\n{'implementation':27s} {'median tok/s':>12s} {'per round':>30s}")
    for name, runs in reports.items():
        rates = [r["tokens_per_sec"] for r in runs]
        summary[f"{name}_tokens_per_sec"] = statistics.median(rates)
        print(f"{name:27s} {statistics.median(rates):12.0f} {', '.join(f'{x:.0f}' for x in rates):>30s}")
    for other in [name for name in commands if name != "jax"]:
        ratios = [j["tokens_per_sec"] / o["tokens_per_sec"] for j, o in zip(reports["jax"], reports[other])]
        key = f"ratio_jax_over_{other.removeprefix('torch-')}"
        summary[key] = statistics.median(ratios)
        print(f"{key:39s} {statistics.median(ratios):6.2f}   per round: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
