"""Tests of llm_jax.data.position: the saved form of per-shard states and picking a run's shards."""

import json

import pytest

from llm_jax.config import ConfigError
from llm_jax.data import position


def test_the_saved_form_keeps_each_shard_state():
    saved = json.loads(json.dumps(position.wrap(8, {3: {"x": 3}, 1: {"x": 1}})))
    assert position.is_current(saved) and saved["shards"] == {"1": {"x": 1}, "3": {"x": 3}}
    assert not position.is_current({"parent": {"next_index": 4}})  # a state from before virtual shards
    assert not position.is_current({"format": 1, "pipeline": {"parent": {}}, "process_index": 0})
    for garbage in ({}, [1], {"format": 1}, {"format": 3}):  # what no version wrote: a damaged checkpoint
        with pytest.raises(position.DamagedDataState):
            position.is_current(garbage)


def test_shards_are_picked_from_every_process_file():
    files = [position.wrap(4, {0: {"at": 0}, 1: {"at": 1}}), position.wrap(4, {1: {"at": 1}, 2: {"at": 2}}),
             position.wrap(4, {3: {"at": 3}})]
    assert position.pick_shards(files, 4, [1, 3]) == {1: {"at": 1}, 3: {"at": 3}}
    with pytest.raises(FileNotFoundError, match=r"lack virtual shards \[3\]") as err:
        position.pick_shards(files[:2], 4, [0, 3])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="set data.virtual_shards=4"):
        position.pick_shards(files, 2, [0])


def test_saved_files_are_read_by_process(tmp_path):
    for name in ("process_0-of-2.json", "process_1-of-2.json", "notes.json"):
        (tmp_path / name).write_text(json.dumps({"name": name}))
    states = position.read_saved_states(tmp_path)
    assert sorted(states) == [(0, 2), (1, 2)] and states[(1, 2)] == {"name": "process_1-of-2.json"}
    (tmp_path / "process_1-of-2.json").write_text("{cut off")
    with pytest.raises(json.JSONDecodeError):  # the checkpoint's restore counts this as damage
        position.read_saved_states(tmp_path)
