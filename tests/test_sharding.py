"""Every parallelism layout follows the single-device float32 loss trajectory (8 fake CPU devices), for a
decoder (gpt2), an encoder (bert) and an encoder-decoder (t5); and a bert fine-tuned to classify or tag
follows it too, and scores the same held-out metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # collected first (conftest.py)

ROOT = Path(__file__).parent.parent


# The modes of sharding_modes.py, in two processes run side by side: each mode is seconds of compiling
# programs of its own, and one process left the CI machine's second core mostly idle. Split by CPU time.
MODE_GROUPS = (["single", "data8", "pmap8", "bert-fsdp8", "bert-mixed222", "bert-tensor8", "t5-single", "t5-data8",
                "t5-fsdp8", "classify-pmap8", "classify-mixed222"],
               ["fsdp8", "mixed222", "tensor8", "bert-single", "bert-data8", "bert-pmap8", "t5-mixed222", "t5-tensor8",
                "t5-pmap8", "classify-single", "tag-single", "tag-mixed222"])
# Fine-tuning in the layouts that exercise what a task adds (its head, pooling and eval counts over a split
# batch, sharded params and pmap's stacked labels) at the suite's time budget: mixed222 splits the batch 4
# ways and the state over fsdp and tensor; data8, fsdp8 and tensor8 match as closely run alone.
TASK_MODES = {"classify": ["mixed222", "pmap8"], "tag": ["mixed222"]}


@pytest.fixture(scope="module")
def trajectories():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "sharding_modes.py"), *modes],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for modes in MODE_GROUPS]
    try:
        outputs = [proc.communicate(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    results = {}
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        results.update(json.loads(out.strip().splitlines()[-1]))
    assert sorted(results) == sorted(mode for modes in MODE_GROUPS for mode in modes)
    return results


@pytest.mark.parametrize("arch", ["", "bert-", "t5-"])
@pytest.mark.parametrize("mode", ["data8", "fsdp8", "mixed222", "tensor8", "pmap8"])
def test_mode_matches_single_device(trajectories, arch, mode):
    single, sharded = trajectories[f"{arch}single"]["losses"], trajectories[f"{arch}{mode}"]["losses"]
    assert len(sharded) == len(single) == 12
    assert single[-1] < single[0] - 0.5  # the run learns, so the comparison means something
    for step, (a, b) in enumerate(zip(single, sharded)):
        assert b == pytest.approx(a, rel=1e-5), f"{mode} step {step + 1}"


@pytest.mark.parametrize("arch", ["", "t5-"])
def test_fsdp_holds_an_eighth_of_the_state(trajectories, arch):
    single, fsdp = trajectories[f"{arch}single"], trajectories[f"{arch}fsdp8"]
    for key in ("param_bytes", "opt_bytes"):
        assert fsdp[key] <= single[key] / 8 * 1.1, key
    assert trajectories[f"{arch}data8"]["param_bytes"] == single["param_bytes"]  # replicated
    assert trajectories[f"{arch}pmap8"]["param_bytes"] == single["param_bytes"]


@pytest.mark.parametrize("arch", ["", "t5-"])
def test_generation_under_a_tensor_parallel_mesh_matches_one_device(trajectories, arch):
    single, tensor = trajectories[f"{arch}single"]["greedy"], trajectories[f"{arch}tensor8"]["greedy"]
    assert [len(tokens) for tokens in single] == [6, 6]
    assert tensor == single


@pytest.mark.parametrize("task, mode", [(task, mode) for task, modes in TASK_MODES.items() for mode in modes])
def test_fine_tuning_matches_single_device(trajectories, task, mode):
    """The task's loss at every step and its held-out metrics; the eval step counts each labelled row
    (classify) or word (tag) once, whatever the devices, and never a padding row."""
    single, sharded = trajectories[f"{task}-single"], trajectories[f"{task}-{mode}"]
    assert len(sharded["losses"]) == len(single["losses"]) == 12
    assert single["losses"][-1] < single["losses"][0] - 0.5  # the run learns
    for step, (a, b) in enumerate(zip(single["losses"], sharded["losses"])):
        assert b == pytest.approx(a, rel=1e-5), f"{task}-{mode} step {step + 1}"
    assert sharded["counted"] == single["counted"] == {"weight": single["expected"], "labelled": single["expected"]}
    assert sorted(sharded["eval"]) == sorted(single["eval"])
    assert sharded["eval"]["eval_loss"] == pytest.approx(single["eval"]["eval_loss"], rel=1e-5)
    for key, value in single["eval"].items():  # ratios of counts: the same predictions give the same numbers
        if key not in ("eval_loss", "eval_perplexity"):
            assert sharded["eval"][key] == pytest.approx(value, abs=1e-9), key
