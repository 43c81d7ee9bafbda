"""Every parallelism layout follows the single-device float32 loss trajectory (8 fake CPU devices), for a
decoder (gpt2), an encoder (bert) and an encoder-decoder (t5)."""

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
                "t5-fsdp8"],
               ["fsdp8", "mixed222", "tensor8", "bert-single", "bert-data8", "bert-pmap8", "t5-mixed222", "t5-tensor8",
                "t5-pmap8"])


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
