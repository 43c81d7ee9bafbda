"""int8 weight-only quantization: per-channel error bounds, logits of int8 models against float ones,
and the int8 export of a trained run read by eval and generate like the run itself."""

import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from test_trainer import WORDS

from llm_jax import cli
from llm_jax.config import ConfigError, ModelConfig, load_config
from llm_jax.infer import quantize
from llm_jax.models.build import init_inputs, make_model
from llm_jax.train import checkpoint as ckpt
from llm_jax.train import loop
from llm_jax.train.metrics import read_metrics


def _random_params(config: ModelConfig, seed: int = 0):
    model = make_model(config)
    tokens, extra = init_inputs(config, 8)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, **extra))["params"]
    rng = np.random.default_rng(seed)
    return model, jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.1, s.dtype), nn.unbox(abstract))


@pytest.mark.parametrize("group_size", [None, 4])
def test_int8_round_trip_is_within_half_a_step_of_each_channel(group_size):
    rng = np.random.default_rng(0)
    # [in 8, out 6], each output channel on its own scale (1e-3 ... 1e2): one shared scale would lose the small ones.
    w = rng.standard_normal((8, 6)).astype(np.float32) * np.logspace(-3, 2, 6, dtype=np.float32)[None, :]
    q = quantize.quantize_weight(jnp.asarray(w), (0,), group_size)
    assert q.qvalue.dtype == jnp.int8 and q.scale.dtype == jnp.float32
    groups = 1 if group_size is None else 8 // group_size
    assert q.scale.shape == (groups, 6)
    # Symmetric absmax per (group of an) output channel; qwix maps it to 127.5, so that the whole int8
    # range [-128, 127] is used and the rounding error stays within half a step.
    step = np.abs(w).reshape(groups, -1, 6).max(axis=1) / 127.5
    np.testing.assert_allclose(np.asarray(q.scale), step, rtol=1e-6)
    error = np.abs(np.asarray(qwix.dequantize(q)) - w).reshape(groups, -1, 6)
    assert np.all(error <= step[:, None, :] * 0.5 * (1 + 1e-4))  # float32 rounding of w / scale
    assert np.abs(np.asarray(q.qvalue, np.int32)).max() in (127, 128)
    with pytest.raises(ConfigError, match="does not divide"):
        quantize.quantize_weight(jnp.asarray(w), (0,), 3)


def test_int8_model_logits_are_close_to_float():
    # llama: untied output head, grouped-query attention, a scanned stack (each layer its own scales);
    # gpt2 (tied, learned positions) is the trained run's below, t5 its int8 export's.
    config = ModelConfig(arch="llama", vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                         max_len=16, scan_layers=True)
    model, params = _random_params(config)
    qparams = quantize.quantize_params(params, config)
    quantized = set(quantize.quantized_paths(qparams))
    _assert_kernels_and_embeddings_alone(params, quantized)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)), jnp.int32)
    logits = jax.jit(lambda p: model.apply({"params": p}, tokens))  # faster than op by op
    full, int8 = logits(params), logits(qparams)
    error = float(jnp.abs(int8 - full).max())
    assert 0 < error < 0.02 * float(jnp.abs(full).max())
    assert quantize.param_bytes(params) > 3 * quantize.param_bytes(qparams)  # d_model 32: scales weigh 1/8 of int8


def test_int8_decoding_reads_the_int8_weights_and_equals_the_dequantized_model():
    """A decode step (a few rows) multiplies by the int8 values as stored (layers.use_cpu_int8_matmul):
    the compiled loop carries int8 kernels and no float32 copy hoisted out of it, and the logits are
    the dequantized model's to float32 rounding. gpt2: tied output projection; 2-axis output kernel."""
    from llm_jax.infer import generate as gen
    from llm_jax.infer.sampling import Sampling
    from llm_jax.kernels import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("the CPU kernels are not built on this machine")
    config = ModelConfig(arch="gpt2", vocab_size=96, n_layers=1, d_model=32, n_heads=4, d_ff=64, max_len=32)
    model, params = _random_params(config)
    qparams = quantize.quantize_params(params, config, group_size=8)
    dequantized = jax.jit(quantize.dequantize_params)(qparams)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 96, (2, 2)), jnp.int32)  # 4 rows: a decode step's
    logits = jax.jit(lambda p: model.apply({"params": p}, tokens))
    int8, reference = logits(qparams), logits(dequantized)
    assert "llm_jax_cpu_int8_matmul" in logits.lower(qparams).as_text()
    np.testing.assert_allclose(np.asarray(int8), np.asarray(reference), rtol=1e-5, atol=1e-5)

    ids, real = gen.pad_prompts([[5, 6, 7]], 4, left=True)
    decoding = gen.Decoding(max_new_tokens=4, sampling=Sampling(temperature=0.0))
    hlo = gen.sample_rows.lower(config, qparams, jnp.asarray(ids), jnp.asarray(real), jax.random.key(0),
                                jnp.asarray(-1, jnp.int32), decoding=decoding).compile().as_text()
    [loop_state] = [line for line in hlo.splitlines() if " while(" in line]
    assert "s8[32,64]" in loop_state and "s8[96,32]" in loop_state  # mlp/fc kernel, the embedding table
    assert "f32[32,64]" not in loop_state and "f32[96,32]" not in loop_state


def _assert_kernels_and_embeddings_alone(params, quantized: set[str]) -> None:
    """Every kernel and embedding table is int8, nothing else (norm scales, biases, T5's relative tables)."""
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(k.key) for k in path)
        assert (name in quantized) == (name.endswith("/kernel") or name.endswith("/embedding")), name


def _run_args(root: Path, corpus: Path, *extra: str) -> list[str]:
    return ["train", "configs/tiny.yaml", f"workdir={root / 'run'}", "data.source=text", f"data.path={corpus}/*.txt",
            f"data.prepared_dir={root / 'prepared'}", "model.vocab_size=300", "tokenizer.sample_bytes=100000",
            "train.progress=false", "train.seq_len=32", "train.batch_size=8", "train.log_every=10",
            "train.eval_every=100", "checkpoint.every=100", "optimizer.lr=3e-3", "optimizer.warmup_steps=5",
            "train.steps=20", "train.sample_tokens=0", *extra]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny gpt2 run trained 20 steps on test_trainer's corpus (a learned, not random, model to
    compress); shared by test_quantize and test_prune."""
    root = tmp_path_factory.mktemp("compress")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(WORDS[(i + j * 3) % len(WORDS)] for j in range(120)) + "\n")
    assert cli.main(_run_args(root, corpus)) == 0
    return root / "run"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llm-jax")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_int8_export_is_read_like_a_run_by_eval_and_generate(trained_run, tmp_path, capsys):
    out = tmp_path / "int8"
    capsys.readouterr()
    assert cli.main(["quantize", str(trained_run), str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["param_bytes_before"] > 3.5 * report["param_bytes_after"]
    assert json.loads((out / "export.json").read_text())["quantization"]["format"] == "int8"

    setup, params, step = loop.restore_for_inference(out)  # the loader eval and generate use
    kernel = params["layer_0"]["mlp"]["fc"]["kernel"]
    assert isinstance(kernel, qwix.QArray) and kernel.qvalue.dtype == jnp.int8  # int8 in memory, not dequantized
    assert step == 20 and setup.tokenizer is not None

    float_eval = [row for row in read_metrics(trained_run / "metrics.jsonl") if "eval_loss" in row][-1]
    assert float_eval["step"] == 20  # the run's final eval, on the batches `eval` reads
    assert cli.main(["eval", str(out)]) == 0
    int8_eval = json.loads(capsys.readouterr().out)
    # The target: within 1% relative perplexity of the float model.
    assert int8_eval["eval_perplexity"] == pytest.approx(float_eval["eval_perplexity"], rel=0.01)
    assert int8_eval["eval_loss"] != float_eval["eval_loss"]  # it really ran the int8 weights
    assert cli.main(["generate", str(out), "--prompt", "the", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the")
    # For inference only: a run cannot start from int8 weights.
    assert cli.main(_run_args(tmp_path, trained_run.parent / "corpus", f"init_from={out}")) == cli.EXIT_USAGE
    assert "int8" in _one_error_line(capsys)


def test_quantize_bad_input_exits_2_with_one_line(trained_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    no_checkpoint = tmp_path / "fresh"
    no_checkpoint.mkdir()
    shutil.copy(trained_run / "config.yaml", no_checkpoint / "config.yaml")
    cases = [([str(trained_run), str(tmp_path / "taken")], "already exists"),
             ([str(no_checkpoint), str(tmp_path / "a")], "no checkpoint"),
             ([str(tmp_path), str(tmp_path / "b")], "not a run directory"),
             ([str(trained_run), str(tmp_path / "c"), "--group-size", "0"], "--group-size"),
             ([str(trained_run), str(tmp_path / "d"), "--group-size", "7"], "does not divide")]
    for args, fragment in cases:
        assert cli.main(["quantize", *args]) == cli.EXIT_USAGE
        assert fragment in _one_error_line(capsys)
    assert not (tmp_path / "d").exists()


def test_int8_t5_export_generates(trained_run, tmp_path, capsys):
    """An encoder-decoder's int8 export through the same loader and `generate` (random weights: this
    checks the int8 path of the encoder, the cross-attention and the decoder loop, not quality)."""
    pairs = tmp_path / "pairs.jsonl"  # seq2seq needs no sentinels, which the run's tokenizer lacks
    pairs.write_text("".join(json.dumps({"input": f"the cat {i}", "target": "sat"}) + "\n" for i in range(8)))
    config = load_config(trained_run / "config.yaml", [
        "data.source=jsonl", f"data.path={pairs}", "data.input_key=input", "data.target_key=target",
        "model.arch=t5", "train.objective=seq2seq", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
        "model.d_ff=64", "model.max_len=64", "tokenizer.extra_ids=0"])
    _, params = _random_params(config.model)
    qparams = quantize.quantize_params(params, config.model)
    _assert_kernels_and_embeddings_alone(params, set(quantize.quantized_paths(qparams)))
    assert params["encoder"]["relative_position"]["bias"].dtype == jnp.float32  # stays float, as checked above
    out = tmp_path / "t5-int8"
    ckpt.export_params(out, quantize.to_stored(qparams), config, trained_run / "tokenizer",
                       {"step": 0, "quantization": {"format": quantize.FORMAT}})
    setup, loaded, _ = loop.restore_for_inference(out)
    assert setup.config.model.arch == "t5" and isinstance(loaded["lm_head"]["kernel"], qwix.QArray)
    capsys.readouterr()
    assert cli.main(["generate", str(out), "--prompt", "the cat", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()
