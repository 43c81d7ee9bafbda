"""An export directory (`llm-jax export`, `quantize` or `prune`) opened for inference, as a run is.

`loop.restore_for_inference` hands an export here, so every command that reads a model (eval,
generate, fill-mask, and any later one) takes a run directory or an export alike, float, int8 or
pruned, without knowing which: an int8 export's weights come back as qwix QArrays, which the
layers dequantize at use (models/layers.py), and a pruned export's are float with their zeros.

The export is read on whatever devices this process has, all data parallel (as `llm-jax export`
reads a run), so a model trained on a pod is evaluated on a laptop.

Also what a pruned export adds for training: its mask (`load_export_mask`, read by `loop.build`
when `init_from` names one).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from llm_jax.config import load_config
from llm_jax.infer import quantize
from llm_jax.parallel import mesh as mesh_lib
from llm_jax.runtime.faults import first_line
from llm_jax.train import checkpoint as ckpt
from llm_jax.train import checkpoint_tree

# The export's model, on this machine's devices: every device holds the whole model, batches are split.
EXPORT_MASK = "mask"  # a pruned export's: True where a weight is kept (infer/prune.py)
LOCAL_MESH = ("parallel.mode=jit", "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1")


def is_export(path: str | Path) -> bool:
    """Whether `path` is an `llm-jax export` (or quantize, or prune) directory, not a run's."""
    path = Path(path)
    return ((path / ckpt.EXPORT_PARAMS).is_dir() and (path / ckpt.EXPORT_CONFIG).is_file()
            and (path / ckpt.EXPORT_INFO).is_file())


def restore_export(path: str | Path, overrides=(), with_data: bool = True) -> tuple[Any, Any, int]:
    """(setup, params, step) of an export, like `loop.restore_for_inference` of a run directory
    (`with_data=False`: the export's own tokenizer alone, its training data never opened)."""
    from llm_jax.train import loop  # which reads exports through this module

    path = Path(path).absolute()
    info = ckpt.export_info(path)
    config = load_config(path / ckpt.EXPORT_CONFIG, [f"workdir={path}", "init_from=", *LOCAL_MESH, *overrides])
    tokenizer = None if with_data else loop.load_run_tokenizer(config, path)
    if tokenizer is None:
        setup = loop.build(config)  # reads the export's tokenizer/, as a run reads its own
    else:
        setup = dataclasses.replace(loop.build(config, with_data=False), tokenizer=tokenizer)
    if "quantization" in info:
        params = quantize.from_stored(read_tree(path / ckpt.EXPORT_PARAMS, setup.mesh))
    else:
        params = ckpt.load_exported_params(path, config.model, setup.abstract_state.params)
    return setup, params, int(info.get("step", 0))


def load_export_mask(path: str | Path) -> dict[tuple[str, ...], np.ndarray] | None:
    """A pruned export's masks by parameter path (True: the weight trains), or None for another export.
    Read on the host: the optimizer places them (train/optim.py keep_masked_zero)."""
    mask_dir = Path(path) / EXPORT_MASK
    if not mask_dir.is_dir():
        return None
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.metadata(mask_dir).item_metadata.tree
            masks = checkpointer.restore(mask_dir, jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree))
    except Exception as e:  # orbax raises many types for damaged or incompatible files
        raise ckpt.CheckpointError(f"init_from: {mask_dir} cannot be restored: {first_line(e)}") from e
    return {path: np.asarray(m, bool) for path, m in checkpoint_tree.flat(masks).items()}


def read_tree(directory: Path, mesh: jax.sharding.Mesh) -> Any:
    """A tree written by orbax, whatever its structure (read from its own metadata), replicated on `mesh`."""
    replicated = mesh_lib.replicated(mesh)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            saved = checkpointer.metadata(directory).item_metadata.tree
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), saved)
            return checkpointer.restore(directory, target)
    except Exception as e:  # orbax raises many types for damaged or incompatible files
        raise ckpt.CheckpointError(f"{directory} cannot be restored: {first_line(e)}") from e
