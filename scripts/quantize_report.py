"""What int8 does to a run: parameter bytes, held-out perplexity and decode speed, float against int8.

    python scripts/quantize_report.py WORKDIR [--group-size N] [--new-tokens 128] [--out DIR]

Writes the int8 export (`llm-jax quantize`) to --out (default: a temporary directory, removed after),
then evaluates the run and the export on the same held-out batches (`llm-jax eval`), and times greedy
decoding of --new-tokens tokens from the run's sample prompt with each (after one untimed call that
compiles). Prints one JSON object. Timings mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax

from llm_jax.commands.quantize import perplexity_change, quantize_run
from llm_jax.infer.generate import generate
from llm_jax.infer.quantize import param_bytes
from llm_jax.train import loop


def decode_tokens_per_sec(path: Path, new_tokens: int, repeats: int = 3) -> float:
    """New tokens per second of greedy decoding at batch 1, the best of `repeats` timed calls."""
    setup, params, _ = loop.restore_for_inference(path)
    tok = setup.tokenizer
    prompt_ids = [tok.bos_id] + tok.encode(setup.config.train.sample_prompt)
    best = float("inf")
    with setup.context(split_batch=False):
        for i in range(repeats + 1):  # the first call compiles
            t0 = time.perf_counter()
            ids = generate(setup.model, params, prompt_ids, max_new_tokens=new_tokens, rng=jax.random.key(0),
                           temperature=0.0)  # no eos: every call decodes all new_tokens
            best = best if i == 0 else min(best, time.perf_counter() - t0)
    assert len(ids) >= new_tokens
    return new_tokens / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="keep the int8 export here")
    args = parser.parse_args(argv)
    tmp = None if args.out else Path(tempfile.mkdtemp(prefix="int8-"))
    out = args.out or tmp / "int8"
    try:
        written = quantize_run(args.workdir, out, group_size=args.group_size)
        _, int8_params, _ = loop.restore_for_inference(out)
        report = {"workdir": str(args.workdir), "group_size": args.group_size,
                  "param_bytes_before": written["param_bytes_before"], "param_bytes_after": param_bytes(int8_params),
                  **perplexity_change(args.workdir, out),
                  "decode_tokens_per_sec_before": decode_tokens_per_sec(args.workdir, args.new_tokens),
                  "decode_tokens_per_sec_after": decode_tokens_per_sec(out, args.new_tokens)}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    report["bytes_ratio"] = report["param_bytes_before"] / report["param_bytes_after"]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
