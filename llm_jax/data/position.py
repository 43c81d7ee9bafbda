"""The saved position of the training data: one grain pipeline state per virtual shard.

The training batches come from `data.virtual_shards` shards of one global document stream
(`data/shards.py`); a shard's state is its grain pipeline's (document reader, piece window, packing),
which restores exactly. Which shards a process runs depends on the rows its devices hold, but a
shard's state does not depend on who runs it, on the process count or on `data.workers`.

grain's checkpoint handler writes one file per process (`process_<index>-of-<count>.json`); each
holds the states of the shards that process runs. A restore, whatever its process count and mesh,
reads every file and takes the states of the shards it runs, so the data continues exactly, with
nothing skipped or seen twice. A shard run by several processes (they hold rows of the same shard)
is saved by each of them, with the same state.

Data states from before virtual shards (no "format": 2) cannot be mapped onto shards: the data then
restarts from the beginning of the stream at the restored step, with a warning (`data/shards.py`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from llm_jax.config import ConfigError

FORMAT = 2
_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class LayoutError(ConfigError):
    """Saved data states that cannot restore this run's shards (another number of shards, missing
    shards, unreadable files): one line."""


def wrap(virtual_shards: int, shard_states: dict[int, dict]) -> dict:
    """The saved form of one process's shard states."""
    return {"format": FORMAT, "virtual_shards": virtual_shards,
            "shards": {str(v): state for v, state in sorted(shard_states.items())}}


class DamagedDataState(ValueError):
    """A saved data state that reads as JSON but holds no position: its checkpoint is damaged."""


def is_current(state: dict) -> bool:
    """Whether a saved state has per-shard positions (False: written before virtual shards).

    Raises DamagedDataState for what no version wrote: a state of before virtual shards is either
    format 1 (a layout and its pipeline) or grain's bare pipeline state, never empty."""
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return True
    previous = isinstance(state, dict) and (
        "pipeline" in state if state.get("format") == 1 else bool(state) and "format" not in state)
    if not previous:
        raise DamagedDataState(f"the saved data state holds no position: {json.dumps(state)[:200]}")
    return False


def pick_shards(saved: Iterable[dict], virtual_shards: int, shards: Iterable[int]) -> dict[int, dict]:
    """The states of `shards` among the saved states of any number of processes (all in the current format)."""
    found: dict[int, dict] = {}
    for state in saved:
        if state["virtual_shards"] != virtual_shards:
            raise LayoutError(f"data.virtual_shards: the checkpoint's data position has {state['virtual_shards']} "
                              f"virtual shards, this run {virtual_shards}; set data.virtual_shards="
                              f"{state['virtual_shards']} to resume it")
        found.update({int(v): shard_state for v, shard_state in state["shards"].items()})
    missing = sorted(set(shards) - set(found))
    if missing:
        # A file of the checkpoint is missing: damage, like any other missing file of it.
        raise FileNotFoundError(f"the checkpoint's data states lack virtual shards {missing} (found "
                                f"{sorted(found)}): a process's file is missing")
    return {v: found[v] for v in shards}


def _saved_files(data_dir: str | Path) -> dict[tuple[int, int], Path]:
    """grain's handler writes one file per process: process_<index>-of-<count>.json."""
    found = {}
    for path in sorted(Path(data_dir).glob("process_*-of-*.json")):
        match = _FILE.fullmatch(path.name)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = path
    return found


def read_saved_states(data_dir: str | Path) -> dict[tuple[int, int], dict]:
    """The per-process states of a checkpoint's data folder: {(process_index, process_count): state}."""
    # A file that cannot be read or parsed raises as it is (OSError, ValueError): the checkpoint's
    # restore sorts it into damage (set aside) or a storage error (left in place).
    return {key: json.loads(path.read_text()) for key, path in _saved_files(data_dir).items()}
