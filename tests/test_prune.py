"""Magnitude pruning: exact sparsity (unstructured, 2:4), global against per-layer thresholds, and
fine-tuning from a pruned export that keeps its zeros."""

import json

import jax
import numpy as np
from test_quantize import _one_error_line, _random_params, _run_args, trained_run  # noqa: F401 - a fixture

from llm_jax import cli
from llm_jax.config import ModelConfig
from llm_jax.infer import prune
from llm_jax.train import exported, loop

# Scanned layers: each layer of a stacked kernel [2, ...] is pruned on its own.
CONFIG = ModelConfig(arch="llama", vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                     max_len=16, scan_layers=True)


def _layers(path, weight):
    return list(weight) if path[0] == "layers" else [weight]


def test_unstructured_per_layer_zeroes_exactly_the_smallest_of_each_layer():
    _, params = _random_params(CONFIG)
    pruned, masks = prune.prune_params(params, CONFIG, 0.3, "unstructured", "layer")
    assert ("layers", "attn", "out", "kernel") in masks and ("layers", "mlp", "gate", "kernel") in masks
    assert not any(p[-1] == "embedding" or p[0] == "lm_head" for p in masks)  # embeddings, vocab head stay dense
    flat = prune._flat(params)
    for path, mask in masks.items():
        new = prune._flat(pruned)[path]
        for old_l, new_l, keep_l in zip(_layers(path, flat[path]), _layers(path, new), _layers(path, mask)):
            assert (~keep_l).sum() == round(0.3 * keep_l.size)  # exact, per layer
            assert np.all(new_l[~keep_l] == 0) and np.array_equal(new_l[keep_l], np.asarray(old_l)[keep_l])
            assert np.abs(np.asarray(old_l))[~keep_l].max() <= np.abs(np.asarray(old_l))[keep_l].min()


def test_global_scope_has_one_threshold_and_exact_total():
    _, params = _random_params(CONFIG)
    # One kernel ten times larger: a global threshold spares it, a per-layer one prunes it like the rest.
    params["layers"]["mlp"]["up"]["kernel"] = params["layers"]["mlp"]["up"]["kernel"] * 10
    _, masks = prune.prune_params(params, CONFIG, 0.5, "unstructured", "global")
    flat = prune._flat(params)
    kept = np.concatenate([np.abs(np.asarray(flat[p]))[m] for p, m in masks.items()])
    dropped = np.concatenate([np.abs(np.asarray(flat[p]))[~m] for p, m in masks.items()])
    assert dropped.size == round(0.5 * (kept.size + dropped.size)) and dropped.max() <= kept.min()
    assert masks[("layers", "mlp", "up", "kernel")].mean() > 0.9
    _, per_layer = prune.prune_params(params, CONFIG, 0.5, "unstructured", "layer")
    assert per_layer[("layers", "mlp", "up", "kernel")].mean() == 0.5
    assert prune.sparsity_of(masks)["sparsity"] == 0.5


def test_ties_are_broken_by_position():
    weight = np.ones((2, 8), np.float32)  # every magnitude equal: the earlier positions go first
    keep = prune._unstructured_layer(weight, 0.25, stacked=False)
    assert keep.reshape(-1).tolist() == [False] * 4 + [True] * 12
    keep = prune._two_of_four(np.ones((8, 1), np.float32), (0,))
    assert keep[:, 0].tolist() == [True, True, False, False] * 2  # 2:4 keeps the earlier of equals


def test_two_of_four_along_the_inputs_of_every_output_channel():
    _, params = _random_params(CONFIG)
    pruned, masks = prune.prune_params(params, CONFIG, 0.5, "2:4")
    for path, mask in masks.items():
        n_in = 8 * 4 if path[-2] == "out" else mask.shape[1]  # out contracts heads x head_dim
        per_channel = mask.reshape(mask.shape[0], n_in, -1)  # [layer, inputs, outputs]
        groups = per_channel.reshape(mask.shape[0], n_in // 4, 4, per_channel.shape[-1])
        assert np.all(groups.sum(axis=2) == 2), path
        old = np.abs(np.asarray(prune._flat(params)[path])).reshape(groups.shape)
        assert np.all(np.where(groups, old, np.inf).min(axis=2) >= np.where(groups, -np.inf, old).max(axis=2))


def test_init_from_a_pruned_export_keeps_the_zeros_while_fine_tuning(trained_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "pruned"
    capsys.readouterr()
    assert cli.main(["prune", str(trained_run), str(out), "--sparsity", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] == 0.5
    masks = exported.load_export_mask(out)
    _, pruned_params, step = loop.restore_for_inference(out)  # read like a run (test_quantize runs eval on one)
    assert step == 20
    assert cli.main(["quantize", str(out), str(tmp_path / "int8")]) == 0  # pruned, then int8: still zero
    qvalue = loop.restore_for_inference(tmp_path / "int8")[1]["layer_1"]["mlp"]["fc"]["kernel"].qvalue
    keep = masks[("layer_1", "mlp", "fc", "kernel")]
    assert np.all(np.asarray(qvalue)[~keep] == 0) and np.count_nonzero(np.asarray(qvalue)[keep]) > 0.9 * keep.sum()

    corpus = trained_run.parent / "corpus"
    assert cli.main(_run_args(tmp_path, corpus, f"init_from={out}", "train.steps=2")) == 0
    _, params, step = loop.restore_for_inference(tmp_path / "run")
    assert step == 2
    pruned_params = prune._flat(jax.device_get(pruned_params))
    for path, keep in masks.items():
        weight = np.asarray(prune._flat(params)[path])
        assert np.all(weight[~keep] == 0), path  # still exactly zero
        assert not np.array_equal(weight[keep], pruned_params[path][keep]), path  # the others trained


def test_prune_bad_input_exits_2_with_one_line(trained_run, tmp_path, capsys):  # noqa: F811
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    cases = [(["--sparsity", "0"], "in (0, 1)"), (["--sparsity", "1.5"], "in (0, 1)"),
             (["--sparsity", "0.3", "--structure", "2:4"], "must be 0.5"),
             (["--sparsity", "0.5", "--structure", "2:8"], "--structure"),
             (["--sparsity", "0.5", "--scope", "model"], "--scope")]
    for options, fragment in cases:
        assert cli.main(["prune", str(trained_run), str(tmp_path / "new"), *options]) == cli.EXIT_USAGE
        assert fragment in _one_error_line(capsys)
    assert cli.main(["prune", str(trained_run), str(tmp_path / "taken"), "--sparsity", "0.5"]) == cli.EXIT_USAGE
    assert "already exists" in _one_error_line(capsys)
    assert cli.main(["prune", str(tmp_path), str(tmp_path / "new"), "--sparsity", "0.5"]) == cli.EXIT_USAGE
    assert "not a run directory" in _one_error_line(capsys)
    assert not (tmp_path / "new").exists()
