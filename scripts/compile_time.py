"""Compile time of the train step against depth, with and without `model.scan_layers`.

For each depth and scan setting it traces, lowers and compiles the same train step `llm-jax train`
runs (abstract inputs: nothing is initialised or run), and prints a table. With scan the layer
body is traced and compiled once, so compile time should stay roughly flat in depth; unrolled, it
grows with every layer. The model is narrow (d_model 128 by default) so the table takes a minute
on a CPU; the depth, not the width, is what matters here.

    python scripts/compile_time.py                       # 12 and 48 layers, scan off and on
    python scripts/compile_time.py --layers 12 24 48 --repeats 2 model.d_model=256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from llm_jax.commands.bench import synthetic_batch
from llm_jax.config import load_config
from llm_jax.parallel import mesh as mesh_lib
from llm_jax.train import loop

NARROW = ["model.d_model=128", "model.n_heads=4", "model.d_ff=512", "model.vocab_size=2048", "model.max_len=128",
          "train.seq_len=128", "train.batch_size=8", "workdir=/tmp/llm_jax_compile_time"]


def compile_seconds(overrides: list[str]) -> tuple[float, float]:
    """(trace + lower, XLA compile) seconds of the train step of a fresh build of this config."""
    config = load_config(None, overrides)
    setup = loop.build(config, with_data=False)
    steps = loop.compile_steps(setup)
    batch_sharding = mesh_lib.batch_sharding(setup.mesh)
    batch = {key: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding)
             for key, x in synthetic_batch(config).items()}
    with setup.context():
        t0 = time.perf_counter()
        lowered = steps.train.lower(setup.abstract_state, batch)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 48])
    parser.add_argument("--repeats", type=int, default=1, help="compiles per cell (median reported)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied after the narrow defaults")
    args = parser.parse_args()
    jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile()  # backend start-up out of the first cell

    rows = []
    print(f"{'layers':>6s} {'scan':>5s} {'trace+lower s':>14s} {'compile s':>10s} {'total s':>8s}", flush=True)
    for scan in (False, True):
        for n_layers in args.layers:
            overrides = [*NARROW, f"model.n_layers={n_layers}", f"model.scan_layers={str(scan).lower()}",
                         *args.overrides]
            runs = [compile_seconds(overrides) for _ in range(args.repeats)]
            lower_s = statistics.median(r[0] for r in runs)
            compile_s = statistics.median(r[1] for r in runs)
            rows.append({"n_layers": n_layers, "scan_layers": scan, "lower_s": lower_s, "compile_s": compile_s})
            print(f"{n_layers:6d} {str(scan):>5s} {lower_s:14.2f} {compile_s:10.2f} {lower_s + compile_s:8.2f}",
                  flush=True)
    for scan in (False, True):
        cells = [r for r in rows if r["scan_layers"] == scan]
        first, last = cells[0], cells[-1]
        growth = (last["lower_s"] + last["compile_s"]) / (first["lower_s"] + first["compile_s"])
        print(f"scan={str(scan).lower()}: {first['n_layers']} -> {last['n_layers']} layers costs {growth:.1f}x "
              "the total time")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
