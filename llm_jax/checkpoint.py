"""Orbax checkpoints of a run: train state, data iterator position and metadata, saved together.

Layout: `workdir/checkpoints/<step>/{state,data,metadata}`. Orbax writes each checkpoint under a
temporary name and renames it when complete, so a save cut short is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llm_jax.config import CheckpointConfig

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored; the message is one line."""


class IteratorCheckpoint:
    """Adapts a data iterator to grain's checkpoint handler, which writes one file per process.

    `get_state`/`set_state` are the data module's JSON state functions.
    """

    def __init__(self, get_state: Callable[[], dict], set_state: Callable[[dict], None]):
        self._get_state = get_state
        self._set_state = set_state

    def get_state(self) -> bytes:
        return json.dumps(self._get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self._set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:  # called by grain's handler after a restore
        pass


class Checkpointer:
    def __init__(self, directory: str | Path, config: CheckpointConfig):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            enable_async_checkpointing=config.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "metadata": ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: IteratorCheckpoint | None, metadata: dict) -> None:
        """Starts a save (async by default); the state arrays are copied before this returns."""
        items = {
            "state": ocp.args.StandardSave(state),
            "metadata": ocp.args.JsonSave(metadata),
        }
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data: IteratorCheckpoint | None) -> tuple[Any, dict]:
        """Restores onto the shardings of `abstract_state` (a tree of ShapeDtypeStructs)."""
        items = {
            "state": ocp.args.StandardRestore(abstract_state),
            "metadata": ocp.args.JsonRestore(),
        }
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for damaged or incompatible files
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be restored: {first_line}") from e
        return restored["state"], dict(restored["metadata"])

    def restore_latest(self, abstract_state: Any, data: IteratorCheckpoint | None) -> tuple[Any, dict] | None:
        """The newest checkpoint that restores, or None when there is none.

        A damaged newest checkpoint is reported and skipped (never deleted); an older one is used.
        """
        failures = []
        for step in reversed(self.all_steps()):
            try:
                return self.restore(step, abstract_state, data)
            except CheckpointError as e:
                moved_to = self._set_aside(step)
                log.warning("%s; moved it to %s and trying an older one", e, moved_to)
                failures.append(str(e))
        if failures:
            raise CheckpointError(failures[0])
        return None

    def _set_aside(self, step: int) -> Path:
        """Moves a checkpoint that cannot be restored out of Orbax's sight (it would block a new
        save of the same step) into `damaged_checkpoints/` beside it: kept, never deleted."""
        target = self.directory.parent / "damaged_checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"llm_jax_set_aside_{step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restoring onto any mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
