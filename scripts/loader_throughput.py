"""Tokens/s of the input pipeline alone (read, tokenize, shuffle, pack, batch), no model.

Compare with the trainer's tokens_per_sec in metrics.jsonl: the loader should be far ahead.
`data.workers=N` and `data.prefetch=N` are measured like any other key.

    python scripts/loader_throughput.py [CONFIG.yaml] [key=value ...] [--batches N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from llm_jax.config import load_config
from llm_jax.data import pipeline, shards
from llm_jax.data.tokenizer import load_or_train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rest", nargs="*", metavar="[CONFIG] key=value")
    parser.add_argument("--batches", type=int, default=500)
    args = parser.parse_args()
    config_path = args.rest[0] if args.rest and "=" not in args.rest[0] else None
    overrides = args.rest[1:] if config_path else args.rest
    config = load_config(config_path, overrides)

    sources = pipeline.open_sources(config)
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = load_or_train_tokenizer(config, workdir, sources)
        iterator = shards.make_train_iterator(config, tokenizer, sources)
        t0 = time.perf_counter()
        first = next(iterator)
        first_batch_s = time.perf_counter() - t0
        real_tokens = 0.0
        t0 = time.perf_counter()
        for _ in range(args.batches):
            batch = next(iterator)
            real_tokens += float(batch["weights"].sum())
        elapsed = time.perf_counter() - t0
        iterator.close()
    tokens = args.batches * first["inputs"].size
    print(json.dumps({
        "loader_tokens_per_sec": tokens / elapsed,
        "first_batch_s": first_batch_s,
        "padding_frac": 1.0 - real_tokens / tokens,
        "batches": args.batches,
        "batch_shape": list(first["inputs"].shape),
        "workers": config.data.workers,
        "prefetch": config.data.prefetch,
    }))


if __name__ == "__main__":
    main()
