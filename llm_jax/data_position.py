"""Where a saved training iterator stands in the document stream, and where a changed layout restarts.

All processes share one global stream of documents (shuffled by seed, reshuffled every epoch). The
stream of process p of P is the global stream from `global_start`, positions p, p + P, p + 2P...,
itself started at `local_start`. A fresh run has both starts at 0.

The layout of a run is its process count and `data.workers`. A checkpoint restored with the same
layout resumes exactly (grain's own state). With another layout no process can take over another's
grain state (the grain handler keeps one file per process, named by the count), so the data
restarts instead:

- Each reader of the old layout (a process, or a worker of a process) has a restart point: the
  first document of its stream that is not yet fully in a batch. grain's packing and window shuffle
  states keep the stream position they restart from, which gives it (minus one document for a
  document cut across pieces).
- Changed `data.workers`, same process count: each process restarts its own stream at the lowest
  restart point of its old workers (`local_start`).
- Changed process count: every process restarts the global stream at the lowest restart point of
  all old readers (`global_start`), with the new slicing.

So no document is skipped. Documents after the slowest reader's point that faster readers already
fed are seen a second time: about a shuffle window of pieces per reader, plus the spread between
readers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from llm_jax.config import ConfigError

FORMAT = 1
_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class LayoutError(ConfigError):
    """A saved state this code cannot read positions from (written by another pipeline)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Who reads which part of the global document stream."""

    process_index: int
    process_count: int
    workers: int  # grain worker processes of each process; 0: read in the process itself
    global_start: int = 0
    local_start: int = 0

    def same_readers(self, other: Layout) -> bool:
        return (self.process_index, self.process_count, self.workers) == (
            other.process_index, other.process_count, other.workers)


def wrap(layout: Layout, pipeline_state: dict) -> dict:
    """The saved form: grain's pipeline state with the layout it belongs to."""
    return {"format": FORMAT, **dataclasses.asdict(layout), "pipeline": pipeline_state}


def unwrap(state: dict, process_index: int, process_count: int) -> tuple[Layout, dict]:
    """(layout, grain state) of a saved state. A bare grain state (written before layouts were saved)
    came from an in-process pipeline of this process."""
    if not isinstance(state, dict):
        raise LayoutError(f"the saved data state is not a mapping: {json.dumps(state)[:200]}")
    if "format" not in state:
        return Layout(process_index, process_count, workers=0), state
    try:
        fields = {f.name: int(state[f.name]) for f in dataclasses.fields(Layout)}
        return Layout(**fields), state["pipeline"]
    except (KeyError, TypeError, ValueError):
        raise LayoutError(f"the saved data state has no layout: {json.dumps(state)[:200]}") from None


def _docs_pulled(reader_state: dict) -> int:
    """Documents the reader's packing restarts after: followed down the packing -> window shuffle ->
    flat map -> document reader states to the reader's `next_index`."""
    node = reader_state
    for _ in range(32):
        if not isinstance(node, dict):
            break
        if "parent_window_start_state" in node:  # window shuffle: restarts from its window's start
            node = node["parent_window_start_state"]
        elif "parent" in node:
            node = node["parent"]
        elif "next_index" in node:
            return int(node["next_index"])
        else:
            break
    raise LayoutError(f"no document position in the saved data state {json.dumps(reader_state)[:200]}")


def reader_restarts(layout: Layout, pipeline_state: dict) -> list[int]:
    """Per reader, the first position (in the process's stream, from local_start) not fully fed."""
    if layout.workers == 0:
        readers = [(0, 1, pipeline_state)]
    else:  # grain interleaves its workers; worker i reads positions i, i + W, ... of the process's stream
        try:
            indices, states = pipeline_state["iterators_in_use_indices"], pipeline_state["iterators_in_use_states"]
        except (KeyError, TypeError):
            raise LayoutError("the saved data state has no per-worker states") from None
        started = dict(zip(indices, states))
        readers = [(i, layout.workers, started.get(i)) for i in range(layout.workers)]
    restarts = []
    for index, stride, state in readers:
        pulled = 0 if state is None else _docs_pulled(state)  # a worker not started yet is at 0
        # The last pulled document may still have pieces in the flat map's buffer: read it again.
        restarts.append(layout.local_start + index + stride * max(pulled - 1, 0))
    return restarts


def global_restart(saved: list[tuple[Layout, dict]]) -> int:
    """The lowest global stream position not fully fed by any reader of the saved layout."""
    positions = []
    for layout, pipeline_state in saved:
        for local in reader_restarts(layout, pipeline_state):
            positions.append(layout.global_start + layout.process_index + layout.process_count * local)
    if not positions:
        raise LayoutError("no saved data states")
    return min(positions)


def _saved_files(data_dir: str | Path) -> dict[tuple[int, int], Path]:
    """grain's handler writes one file per process: process_<index>-of-<count>.json."""
    found = {}
    for path in sorted(Path(data_dir).glob("process_*-of-*.json")):
        match = _FILE.fullmatch(path.name)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = path
    return found


def saved_processes(data_dir: str | Path) -> set[tuple[int, int]]:
    """(process_index, process_count) of every state saved in a checkpoint's data folder."""
    return set(_saved_files(data_dir))


def read_saved_states(data_dir: str | Path) -> dict[tuple[int, int], dict]:
    """The per-process states of a checkpoint's data folder: {(process_index, process_count): state}."""
    return {key: json.loads(path.read_text()) for key, path in _saved_files(data_dir).items()}
