"""`llm-jax plan`: the per-device memory of a sharded train step, compiled ahead of time."""

import importlib.util
import json
import subprocess
import sys

import pytest
from pod_processes import REPO

from llm_jax import cli

TINY = ["configs/tiny.yaml"]


def _plan_json(capsys, *args) -> dict:
    assert cli.main(["plan", *TINY, *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["gpt2", "bert", "t5"])
def test_single_device_plan_counts_every_byte(capsys, arch):
    plan = _plan_json(capsys, f"model.arch={arch}", "mesh.data=1", "--devices", "1", "--device-memory", "1GiB")
    assert plan["param_bytes"] == 4 * plan["params"]  # float32, nothing sharded
    assert plan["optimizer_bytes"] >= 2 * plan["param_bytes"]  # AdamW's two moments
    assert plan["total_bytes"] > plan["param_bytes"] + plan["optimizer_bytes"]
    assert plan["fits"] is True

    small = _plan_json(capsys, "mesh.data=1", "--devices", "1", "--device-memory", "1MiB")
    assert small["fits"] is False


def test_the_t5_base_preset_is_t5_v1_1_base():
    """248M parameters: 12 + 12 layers, d 768, untied embeddings of 32128 (abstract: nothing is allocated)."""
    from llm_jax.config import load_config
    from llm_jax.models.decoder import count_params
    from llm_jax.train import loop

    config = load_config("configs/t5_base.yaml", [])
    assert (config.train.seq_len, config.target_len) == (512, 114)
    params = count_params(loop.build(config, with_data=False).abstract_state.params)
    assert params == pytest.approx(248e6, rel=0.005)


def test_fsdp_over_eight_fake_devices_holds_an_eighth():
    # A fresh process: this one already started JAX with a single CPU device.
    result = subprocess.run(
        [sys.executable, "-m", "llm_jax.cli", "plan", *TINY, "mesh.data=1", "mesh.fsdp=-1", "--devices", "8",
         "--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert plan["devices"] == "8x cpu"
    whole = 4 * plan["params"]
    assert whole / 8 <= plan["param_bytes"] <= whole / 8 * 1.1
    assert plan["fits"] is None  # no device memory given, no verdict


def _plan_on_eight_devices(*args) -> dict:
    result = subprocess.run([sys.executable, "-m", "llm_jax.cli", "plan", *args, "--devices", "8", "--json"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_gradient_accumulation_keeps_fsdp_memory():
    """The 13.9M baby GPT over fsdp=8: accumulating 4 micro-batches must not cost more per-device
    temporaries than one big batch (each micro-batch's activations are a quarter). It did cost 1.3x:
    XLA hoisted the weights' all-gathers out of the accumulation loop, holding every weight whole."""
    args = ["configs/baby_gpt.yaml", "mesh.data=1", "mesh.fsdp=8", "train.batch_size=32", "train.seq_len=64"]
    whole = _plan_on_eight_devices(*args, "optimizer.grad_accum=1")
    accumulated = _plan_on_eight_devices(*args, "optimizer.grad_accum=4")
    assert accumulated["temporary_bytes"] <= 1.1 * whole["temporary_bytes"], (accumulated, whole)


@pytest.mark.parametrize("args, fragment", [
    ([], "needs the device count"),
    (["--devices", "1", "--device-memory", "lots"], "is not a size"),
    (["mesh.data=1", "parallel.mode=pmap", "--devices", "1"], "compiles the sharded step"),
    (["mesh.data=2", "--devices", "1"], "must equal the 1 devices"),
])
def test_plan_errors_are_one_line(capsys, args, fragment):
    assert cli.main(["plan", *TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu installed: the topology exists")
def test_tpu_topology_without_libtpu_is_a_clear_error(capsys):
    assert cli.main(["plan", *TINY, "--topology", "v5p:2x2x1"]) == 2
    assert "install the TPU extra" in capsys.readouterr().err
