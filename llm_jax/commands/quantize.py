"""`llm-jax quantize WORKDIR OUT [--group-size N]`: an int8 export of a run (infer/quantize.py).

OUT has `llm-jax export`'s layout, so `eval OUT` and `generate OUT` read it as they read a run; its
kernels and embedding tables are int8 with float32 scales, and export.json says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_jax.commands.export import restore_run
from llm_jax.config import ConfigError
from llm_jax.infer import quantize
from llm_jax.models.decoder import count_params
from llm_jax.train import checkpoint as ckpt
from llm_jax.train import loop
from llm_jax.train.checkpoint import check_out


def quantize_run(workdir: str | Path, out: str | Path, group_size: int | None = None) -> dict[str, Any]:
    """Writes the int8 export of the run's newest checkpoint; returns what it wrote and the bytes
    of the parameters before and after."""
    if group_size is not None and group_size < 1:
        raise ConfigError(f"--group-size must be a positive number of input channels, got {group_size}")
    check_out(out)  # before the checkpoint is read
    workdir = Path(workdir)
    config, params, step = restore_run(workdir)
    qparams = quantize.quantize_params(params, config.model, group_size)
    before, after = quantize.param_bytes(params), quantize.param_bytes(qparams)
    info = {"step": step, "workdir": str(workdir.absolute()), "params": count_params(params),
            "quantization": {"format": quantize.FORMAT, "group_size": group_size,
                             "weights": quantize.quantized_paths(qparams)},
            "param_bytes_before": before, "param_bytes_after": after}
    path = ckpt.export_params(out, quantize.to_stored(qparams), config, workdir / "tokenizer", info)
    return {"step": step, "out": str(path), "group_size": group_size, "param_bytes_before": before,
            "param_bytes_after": after, "ratio": round(before / after, 3)}


def held_out_eval(path: str | Path, overrides=()) -> dict[str, Any]:
    """`llm-jax eval PATH`'s result (a run or an export, float or int8): the held-out loss and perplexity."""
    setup, params, step = loop.restore_for_inference(path, overrides)
    steps = loop.compile_steps(setup)
    return {"step": step, **loop.evaluate(setup, steps.eval, params, loop.held_out_batches(setup))}


def perplexity_change(workdir: str | Path, out: str | Path, overrides=()) -> dict[str, float]:
    """Held-out perplexity of a run and of its int8 export (the same batches), and the relative change
    (the target: within 1%)."""
    before, after = held_out_eval(workdir, overrides), held_out_eval(out, overrides)
    return {"eval_perplexity_before": before["eval_perplexity"], "eval_perplexity_after": after["eval_perplexity"],
            "relative_change": after["eval_perplexity"] / before["eval_perplexity"] - 1.0}
