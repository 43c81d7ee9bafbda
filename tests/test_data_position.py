"""Tests of llm_jax.data.position: the saved form of iterator states and the restart arithmetic."""

import json

import pytest

from llm_jax.config import ConfigError
from llm_jax.data import position


def reader(pulled, window=True):
    """A packing state over (window shuffle over) a flat map over a document reader at `pulled`."""
    flat_map = {"parent": {"next_index": pulled}, "next_index_in_buffer": 1}
    inner = {"parent_window_start_state": flat_map, "window_index": 3, "pos_in_window": 5} if window else flat_map
    return {"parent": inner, "next_row": 2, "counter": 40}


def test_wrap_and_unwrap_keep_the_layout():
    layout = position.Layout(1, 4, workers=2, global_start=100, local_start=7)
    saved = json.loads(json.dumps(position.wrap(layout, {"x": 1})))
    assert position.unwrap(saved, 0, 1) == (layout, {"x": 1})
    # A bare grain state (checkpoints from before layouts were saved): this process, in-process.
    assert position.unwrap(reader(3), 2, 4) == (position.Layout(2, 4, workers=0), reader(3))


def test_reader_restarts_in_process_and_with_workers():
    assert position.reader_restarts(position.Layout(0, 1, 0, local_start=10), reader(8)) == [17]
    assert position.reader_restarts(position.Layout(0, 1, 0), reader(0, window=False)) == [0]
    interleave = {"iterators_in_use_indices": [1, 0], "iterators_in_use_states": [reader(5), reader(9)]}
    # Worker i reads positions i, i + 3, ... of the process's stream; worker 2 has not started.
    assert position.reader_restarts(position.Layout(0, 1, 3), interleave) == [0 + 3 * 8, 1 + 3 * 4, 2]


def test_global_restart_is_the_lowest_position_of_any_reader():
    saved = [(position.Layout(p, 2, 0, global_start=50), reader(pulled)) for p, pulled in ((0, 6), (1, 4))]
    # process 0: 50 + 0 + 2 * 5 = 60; process 1: 50 + 1 + 2 * 3 = 57
    assert position.global_restart(saved) == 57


def test_unknown_states_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no document position") as err:
        position.reader_restarts(position.Layout(0, 1, 0), {"something": "else"})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="per-worker"):
        position.reader_restarts(position.Layout(0, 1, 2), reader(3))
    for name in ("process_0-of-2.json", "process_1-of-2.json", "notes.json"):
        (tmp_path / name).write_text(json.dumps({"name": name}))
    assert position.saved_processes(tmp_path) == {(0, 2), (1, 2)}
    assert position.read_saved_states(tmp_path)[(1, 2)] == {"name": "process_1-of-2.json"}
