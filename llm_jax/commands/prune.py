"""`llm-jax prune WORKDIR OUT --sparsity 0.5 [--structure unstructured|2:4] [--scope layer|global]`:
a pruned export of a run (infer/prune.py), with its mask.

OUT has `llm-jax export`'s layout plus `mask/`: `eval OUT` and `generate OUT` read it as they read a
run, and a run started from it (`init_from=OUT`) keeps the pruned weights at zero while it trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_jax.commands.export import restore_run
from llm_jax.infer import prune
from llm_jax.models.decoder import count_params
from llm_jax.train import checkpoint as ckpt
from llm_jax.train import exported
from llm_jax.train.checkpoint import check_out


def prune_run(workdir: str | Path, out: str | Path, sparsity: float, structure: str = "unstructured",
              scope: str = "layer") -> dict[str, Any]:
    """Writes the pruned export of the run's newest checkpoint; returns what it wrote and the sparsity."""
    prune.check_options(sparsity, structure, scope)  # before the checkpoint is read
    check_out(out)
    workdir = Path(workdir)
    config, params, step = restore_run(workdir)
    pruned, masks = prune.prune_params(params, config.model, sparsity, structure, scope)
    report = {"structure": structure, "scope": scope, "requested_sparsity": sparsity, **prune.sparsity_of(masks)}
    info = {"step": step, "workdir": str(workdir.absolute()), "params": count_params(params),
            "pruning": {**report, "weights": sorted("/".join(path) for path in masks)}}
    path = ckpt.export_params(out, pruned, config, workdir / "tokenizer", info,
                              extra={exported.EXPORT_MASK: prune.nested_masks(masks)})
    return {"step": step, "out": str(path), **report}
