"""FLOPs accounting and MFU (flops.py) and the bench report's extra fields. `bench` itself runs in test_cli."""

import jax
import pytest

from llm_jax.commands import bench
from llm_jax.config import load_config
from llm_jax.kernels import cpu_kernels
from llm_jax.models import flops
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


def test_an_encoder_decoder_token_costs_a_share_of_its_rows_flops():
    """seq2seq with targets as long as the inputs: every matmul kernel (the input embedding is a lookup)
    runs on half of a row's tokens, the encoder's on the inputs, the decoder's on the targets, but
    for the cross-attention's keys and values, which project the encoder's outputs."""
    config = load_config(None, ["model.arch=t5", "train.objective=seq2seq", "model.n_layers=2", "model.d_model=64",
                                "model.n_heads=4", "model.d_ff=96", "model.vocab_size=400", "train.seq_len=32"])
    params = loop.build(config, with_data=False).abstract_state.params
    kernels = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                  if path[-1].key == "kernel")
    d, length, layers = 64, 32, 2
    assert flops.tokens_per_row(config) == 2 * length
    # Span corruption's targets are shorter (T5's length rule): inputs 32, targets 8.
    assert flops.tokens_per_row(load_config(None, ["model.arch=t5", "train.seq_len=32"])) == 32 + 8
    attention = 12 * d * (layers * length * length + layers * length * 2 * length)  # encoder; decoder: self + cross
    assert flops.flops_per_token(config) == pytest.approx((6 * kernels * length + attention) / (2 * length))


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
