"""FLOPs accounting and MFU (flops.py) and the bench report's extra fields. `bench` itself runs in test_cli."""

import json

import jax
import numpy as np
import pytest

from llm_jax.commands import bench
from llm_jax.config import load_config
from llm_jax.kernels import cpu_kernels
from llm_jax.models import flops
from llm_jax.models.build import ENCODER_KEYS
from llm_jax.models.decoder import count_params
from llm_jax.train import loop


def test_flops_per_token_of_the_baby_gpt_by_hand():
    config = load_config("configs/baby_gpt.yaml", [])
    d, f, vocab, layers, seq = 384, 1536, 8192, 6, 256
    matmul_weights = layers * (4 * d * d + 2 * d * f) + d * vocab  # q, k, v, out; fc, proj; tied output
    assert flops.matmul_param_count(config) == matmul_weights
    assert flops.flops_per_token(config) == 6 * matmul_weights + 12 * layers * d * seq


def test_matmul_weights_are_all_parameters_but_embeddings_and_norms():
    # llama: untied embeddings, no biases, grouped-query attention; RMSNorm scales are the only vectors.
    config = load_config(None, ["model.arch=llama", "model.n_layers=2", "model.d_model=64", "model.n_heads=4",
                                "model.n_kv_heads=2", "model.d_ff=96", "model.vocab_size=300"])
    setup = loop.build(config, with_data=False)
    m = config.model
    input_embedding = m.vocab_size * m.d_model
    norm_scales = (2 * m.n_layers + 1) * m.d_model
    assert flops.matmul_param_count(config) == count_params(setup.abstract_state.params) - input_embedding - norm_scales


def test_an_encoder_decoder_bench_batch_has_both_sides():
    """Span corruption's layout (data/pipeline.py): seq_len encoder inputs, target_len targets (64 -> 14),
    the decoder reading the targets shifted right after the start id 0, every target weighted. The
    step itself runs on it in the t5 sharding modes (test_sharding.py)."""
    config = load_config("configs/tiny.yaml", ["model.arch=t5"])
    batch = bench.synthetic_batch(config)
    assert sorted(batch) == sorted([*ENCODER_KEYS, "inputs", "targets", "segment_ids", "positions", "weights"])
    assert {k: v.shape for k, v in batch.items() if k in ENCODER_KEYS} == dict.fromkeys(ENCODER_KEYS, (8, 64))
    assert {k: v.shape for k, v in batch.items() if k not in ENCODER_KEYS} == dict.fromkeys(
        ("inputs", "targets", "segment_ids", "positions", "weights"), (8, 14))
    np.testing.assert_array_equal(batch["inputs"], np.pad(batch["targets"][:, :-1], ((0, 0), (1, 0))))
    assert batch["weights"].min() == 1.0 and batch["encoder_inputs"].min() >= 4
    assert flops.tokens_per_row(config) == 64 + 14  # what bench's tokens_per_sec counts per row


def test_mfu_is_model_flops_over_peak_and_none_without_a_peak():
    config = load_config("configs/baby_gpt.yaml", [])
    assert flops.mfu(1000.0, config, None) is None
    assert flops.mfu(1000.0, config, 2e11) == pytest.approx(1000.0 * flops.flops_per_token(config) / 2e11)


def test_known_accelerators_use_the_table_and_the_cpu_is_measured_once():
    class FakeDevice:
        platform = "gpu"
        device_kind = "NVIDIA H100 80GB HBM3"

    assert flops.device_peak_flops(FakeDevice()) == 989e12
    FakeDevice.device_kind, FakeDevice.platform = "TPU v5 lite", "tpu"
    assert flops.device_peak_flops(FakeDevice()) == 197e12
    FakeDevice.device_kind = "Some future chip"
    assert flops.device_peak_flops(FakeDevice()) is None

    first = flops.measure_cpu_matmul_flops(128, 2)
    assert first > 1e8  # any CPU does a 128^3 matmul at well over 0.1 GFLOP/s
    assert flops.measure_cpu_matmul_flops(128, 2) == first  # cached: measured once per process
    cpu = jax.devices("cpu")[0]
    assert flops.device_peak_flops(cpu) == flops.measure_cpu_matmul_flops()


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_bench_reports_parameters_memory_and_cpu_time(tmp_path, arch):
    config = load_config("configs/tiny.yaml", [f"workdir={tmp_path}", f"model.arch={arch}"])
    report = bench.run_bench(config, steps=2, warmup=0)
    assert report["tokens_per_sec"] == pytest.approx(8 * flops.tokens_per_row(config) / report["step_time_s"])
    assert report["params"] == count_params(loop.build(config, with_data=False).abstract_state.params)
    assert 0 < report["temp_memory_bytes"] <= report["peak_memory_bytes"]
    assert report["step_cpu_time_s"] > 0
    assert report["mfu"] == pytest.approx(report["tokens_per_sec"] * report["flops_per_token"] / report["peak_flops"])
    assert report["cpu_kernels"] == cpu_kernels.available()  # tiny.yaml is float32 on one CPU device


def test_bench_decode_prints_new_tokens_per_second(capsys, tmp_path):
    from llm_jax import cli

    assert cli.main(["bench", "configs/tiny.yaml", f"workdir={tmp_path}", "model.n_layers=1", "--decode", "--batch",
                     "2", "--prompt-len", "5", "--new-tokens", "4", "--steps", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["decode_tokens_per_sec"] == pytest.approx(2 * 4 / report["seconds_per_call"])
    assert report["param_bytes"] == 4 * report["params"]  # float32
    assert cli.main(["bench", "configs/tiny.yaml", f"workdir={tmp_path}", "model.n_layers=1", "--decode", "--batch",
                     "1", "--prompt-len", "5", "--new-tokens", "4", "--steps", "1", "--int8"]) == 0
    int8 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert int8["weights"].startswith("int8") and int8["params"] == report["params"]
    assert int8["param_bytes"] < 0.4 * report["param_bytes"]  # int8 values and float32 scales
