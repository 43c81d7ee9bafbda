"""`llm-jax export WORKDIR OUT`: the parameters of a run alone, for inference and fine-tuning.

A new run starts from them with `init_from=OUT` (fresh optimizer, step 0). The checkpoint is
restored onto whatever devices this process has, so a run trained on a pod exports on a laptop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_jax.config import Config, ConfigError, load_config, to_dict
from llm_jax.models.decoder import count_params
from llm_jax.train import checkpoint as ckpt
from llm_jax.train import exported, loop
from llm_jax.train.early_stopping import best_metric


def export_run(workdir: str | Path, out: str | Path, best: bool = False) -> dict[str, Any]:
    """Writes the newest checkpoint's parameters (or, with `best`, those of the best eval loss, or
    of the early-stopping metric when the run names one)."""
    workdir = Path(workdir)
    config, params, step = restore_run(workdir, best)
    info = {"step": step, "workdir": str(workdir.absolute()), "params": count_params(params)}
    path = ckpt.export_params(out, params, config, workdir / "tokenizer", info)
    return {**info, "out": str(path)}


def restore_run(workdir: Path, best: bool = False, overrides: tuple[str, ...] = ()) -> tuple[Config, Any, int]:
    """(config, params, step) of a run's newest checkpoint (or, with `best`, of its lowest eval loss);
    or of a float export (a pruned one, to be quantized too). `overrides`: settings that leave the tree
    restorable, e.g. model.scan_layers=false for the parameters layer by layer (the restore relayouts)."""
    if exported.is_export(workdir) and not best:
        return _restore_export(workdir, overrides)
    config_path = workdir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{workdir} is not a run directory (no config.yaml)")
    # The run's own model; the mesh of this machine (all devices data parallel), whatever the run used.
    config = load_config(config_path, [f"workdir={workdir}", "parallel.mode=jit", "mesh.data=-1", "mesh.fsdp=1",
                                       "mesh.tensor=1", *overrides])
    setup = loop.build(config, with_data=False)
    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", config.checkpoint, read_only=True,
                                     run_config=to_dict(config), best=best_metric(config),
                                     keep_best=config.checkpoint.keep_best or bool(config.train.early_stopping.metric))
    try:
        if best:
            step = checkpointer.best_step()
            if step is None:
                raise ConfigError(f"{workdir} has no checkpoint with {best_metric(config)[0]}; --best needs a run "
                                  "trained with checkpoint.keep_best=true or train.early_stopping.metric")
            state, _ = checkpointer.restore(step, setup.abstract_state)
        else:
            restored = checkpointer.restore_latest(setup.abstract_state)
            if restored is None:
                raise ConfigError(f"{workdir} has no checkpoint yet (checkpoints/ is empty)")
            state, metadata = restored
            step = int(metadata["step"])
    finally:
        checkpointer.close()
    return config, state.params, step


def _restore_export(path: Path, overrides: tuple[str, ...] = ()) -> tuple[Config, Any, int]:
    info = ckpt.export_info(path)
    if "quantization" in info:
        raise ConfigError(f"{path} holds int8 weights already (llm-jax quantize); start from a run or a float export")
    config = load_config(path / ckpt.EXPORT_CONFIG, [f"workdir={path}", "init_from=", "parallel.mode=jit",
                                                     "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1", *overrides])
    setup = loop.build(config, with_data=False)
    return config, ckpt.load_exported_params(path, config.model, setup.abstract_state.params), int(info.get("step", 0))
