"""Restore rules. Settings that keep the values restore transparently (scan_layers both ways, clip_norm,
the data); a config whose tree does not fit is a one-line config error and moves nothing; only damaged
files are set aside (never deleted) and an older checkpoint is used; storage errors move nothing; a
damaged step newer than every good one stops the run unless checkpoint.ignore_damaged."""

import errno
import json
import logging
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from test_trainer import _config, corpus  # noqa: F401 - the corpus fixture

from llm_jax import cli
from llm_jax.commands.export import export_run
from llm_jax.config import ConfigError
from llm_jax.train import checkpoint as ckpt
from llm_jax.train import loop
from llm_jax.train.loop import train
from llm_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # collected first (conftest.py)

DAMAGED = "damaged_checkpoints"  # the public name, beside checkpoints/


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _truncate_state_files(step_dir: Path) -> int:
    damaged = 0
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
            damaged += 1
    return damaged


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, corpus, caplog):  # noqa: F811
    train(_config(tmp_path, corpus, "train.steps=20"))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert _truncate_state_files(checkpoints / "20") > 0

    summary = train(_config(tmp_path, corpus, "train.steps=25"))
    assert summary["step"] == 25
    assert "is damaged" in caplog.text
    rows = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows == [5, 10, 15, 20, 15, 20, 25]  # resumed after step 10, not from scratch
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert steps[-1] == 25
    # The damaged files are kept for inspection, beside the checkpoints, not deleted.
    assert list(checkpoints.parent.glob("damaged_checkpoints/20*"))


def test_a_damaged_data_position_falls_back_to_the_previous_checkpoint(tmp_path, corpus, caplog):  # noqa: F811
    # The data position is a file of the checkpoint like the state's: cut short, the checkpoint is damaged.
    train(_config(tmp_path, corpus, "train.steps=20"))
    checkpoints = tmp_path / "run" / "checkpoints"
    (data_file,) = (checkpoints / "20" / "data").glob("process_*.json")
    data_file.write_text(data_file.read_text()[:10])

    summary = train(_config(tmp_path, corpus, "train.steps=25"))
    assert summary["step"] == 25
    assert "is damaged" in caplog.text
    rows = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows == [5, 10, 15, 20, 15, 20, 25]
    assert list(checkpoints.parent.glob("damaged_checkpoints/20*"))


@pytest.mark.parametrize("keep_best", [False, True])
def test_a_read_only_checkpointer_opens_without_warnings(tmp_path, caplog, keep_best):
    # eval, generate and export open checkpoints read-only on purpose: Orbax's notice of it is noise.
    from llm_jax.config import CheckpointConfig
    from llm_jax.train.checkpoint import Checkpointer

    (tmp_path / "checkpoints").mkdir()
    with caplog.at_level("INFO"):
        checkpointer = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(keep_best=keep_best), read_only=True)
        assert checkpointer.latest_step() is None
        checkpointer.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings  # neither "Given directory is read only" nor the options Orbax resets
    # Other Orbax warnings still get through: the filter is gone once the manager exists.
    with caplog.at_level("WARNING"):
        logging.getLogger("absl").warning("Given directory is read only=%s", "x")
    assert "Given directory is read only=x" in caplog.text


# ----------------------------------------------------------------------------- restore rules


def _cli_args(root: Path, corpus: Path, *extra: str) -> list[str]:  # noqa: F811
    """`llm-jax train` arguments of the tiny run that test_trainer._config builds."""
    return ["train", "configs/tiny.yaml", f"workdir={root / 'run'}", "data.source=text", f"data.path={corpus}/*.txt",
            f"data.prepared_dir={root / 'prepared'}", "model.vocab_size=300", "tokenizer.sample_bytes=100000",
            "train.progress=false", "train.seq_len=32", "train.batch_size=8", "train.log_every=1",
            "train.eval_every=100", "checkpoint.every=4", "optimizer.lr=3e-3", "optimizer.warmup_steps=5",
            "optimizer.decay_steps=8", "train.sample_tokens=2", *extra]


def _losses(workdir: Path) -> dict[int, float]:
    rows = [r for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]
    assert len({r["step"] for r in rows}) == len(rows), "a step was trained twice"
    return {r["step"]: r["loss"] for r in rows}


def _files(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus):  # noqa: F811
    """One finished 8-step run with checkpoints at steps 4 and 8; tests work on copies of it."""
    root = tmp_path_factory.mktemp("base")
    assert cli.main(_cli_args(root, corpus, "train.steps=8")) == 0
    return root


def _copy_run(base: Path, tmp_path: Path) -> Path:
    shutil.copytree(base / "run", tmp_path / "run")
    return tmp_path / "run"


# Through the CLI one way (what a user does first: turn scan on); test_checkpoint_tree converts both ways.
def test_scan_layers_flipped_on_resume_continues_like_an_uninterrupted_run(base_run, tmp_path, corpus,  # noqa: F811
                                                                           caplog):
    # Scanned layers draw other initial values than unrolled ones: compare with a whole run of the first
    # setting, unrolled (the default): base_run, the same 8-step command.
    parts = tmp_path / "parts"
    assert cli.main(_cli_args(parts, corpus, "train.steps=4", "model.scan_layers=false")) == 0
    caplog.set_level(logging.INFO, logger="llm_jax")
    assert cli.main(_cli_args(parts, corpus, "train.steps=8", "model.scan_layers=true")) == 0
    assert "resumed from step 4" in caplog.text
    expected, resumed = _losses(base_run / "run"), _losses(parts / "run")
    assert sorted(resumed) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step
    assert not (parts / "run" / DAMAGED).exists()


def test_a_changed_model_or_optimizer_exits_2_with_one_line_and_moves_nothing(base_run, tmp_path,
                                                                             corpus, capsys):  # noqa: F811
    workdir = _copy_run(base_run, tmp_path)
    before = _files(workdir / "checkpoints")
    capsys.readouterr()
    for change, named in [("model.d_model=128", "model.d_model 64 -> 128"),
                          ("optimizer.name=lamb", "optimizer.name 'adamw' -> 'lamb'"),
                          ("model.param_dtype=bfloat16", "model.param_dtype")]:
        assert cli.main(_cli_args(tmp_path, corpus, "train.steps=12", change)) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("llm-jax")]
        assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert "does not fit this config" in errors[0] and named in errors[0], errors[0]
    # Without the run's config.yaml the checkpoint's own tree still says what differs.
    (workdir / "config.yaml").unlink()
    assert cli.main(_cli_args(tmp_path, corpus, "train.steps=12", "model.d_model=32")) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "params/embed/embedding is float32[300,64] in the checkpoint, float32[300,32]" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    assert _files(workdir / "checkpoints") == before
    assert not (workdir / DAMAGED).exists()

    assert cli.main(_cli_args(tmp_path, corpus, "train.steps=9")) == 0  # the original command resumes
    assert sorted(_losses(workdir)) == list(range(1, 10))


def _permission_denied() -> Exception:
    """What orbax raises when TensorStore may not open a file of the checkpoint (seen with a 000 file)."""
    error = Exception("Encountered error while reading array index: (slice(0, 300, 1), slice(0, 64, 1))")
    error.__cause__ = ValueError('PERMISSION_DENIED: Error reading "params.embed.embedding/0.0" in OCDBT database: '
                                 'Failed to open: Permission denied [os_error_code=13]')
    return error


@pytest.mark.parametrize("error", [_permission_denied(), OSError(errno.ENOSPC, "No space left on device")])
def test_a_storage_error_is_reported_and_moves_nothing(base_run, tmp_path, corpus, error):  # noqa: F811
    workdir = _copy_run(base_run, tmp_path)
    before = _files(workdir / "checkpoints")
    config = _config(tmp_path, corpus)
    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", config.checkpoint)

    def fail(*args, **kwargs):
        raise error

    checkpointer.manager.restore = fail
    with pytest.raises(ckpt.CheckpointError, match="storage error") as raised:
        checkpointer.restore_latest(loop.build(config, with_data=False).abstract_state, None)
    assert not isinstance(raised.value, ckpt.DamagedCheckpointError) and "\n" not in str(raised.value)
    assert "checkpoints/8" in str(raised.value)  # the newest was tried, and nothing else
    checkpointer.close()
    assert _files(workdir / "checkpoints") == before
    assert not (workdir / DAMAGED).exists()


def test_a_lost_checkpoint_directory_is_reported_and_moves_nothing(base_run, tmp_path, corpus):  # noqa: F811
    workdir = _copy_run(base_run, tmp_path)
    config = _config(tmp_path, corpus)
    abstract_state = loop.build(config, with_data=False).abstract_state
    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", config.checkpoint)
    (workdir / "checkpoints").rename(tmp_path / "elsewhere")  # an unmounted volume, after the listing
    with pytest.raises(ckpt.CheckpointError, match="storage error"):
        checkpointer.restore_latest(abstract_state, None)
    assert not (workdir / DAMAGED).exists()
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["4", "8"]


def test_a_newer_damaged_step_resumes_from_the_newest_good_one_and_never_from_zero(base_run, tmp_path,
                                                                                   corpus, caplog):  # noqa: F811
    # A run that set step 8 aside, went on from step 4 and was killed before its next save: the rerun
    # goes on from step 4 as that run did, with a warning, not with an error.
    workdir = _copy_run(base_run, tmp_path)
    (workdir / DAMAGED).mkdir()
    (workdir / "checkpoints" / "8").rename(workdir / DAMAGED / "8-20260101-000000")
    summary = train(_config(tmp_path, corpus, "train.steps=10"))
    assert summary["step"] == 10 and "holds step 8, newer than every good checkpoint" in caplog.text
    rows = [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]
    assert rows[-2:] == [5, 10] and rows.count(5) == 2  # resumed after step 4, not from scratch
    caplog.clear()
    assert train(_config(tmp_path, corpus, "train.steps=6"))["step"] == 10  # below the newest step: said aloud
    assert "already at step 10, past train.steps=6" in caplog.text
    # With no good checkpoint left the run would start over at step 0: only when asked.
    for step in _checkpoint_steps(workdir):
        (workdir / "checkpoints" / str(step)).rename(workdir / DAMAGED / f"{step + 100}-20260101-000000")
    with pytest.raises(ckpt.CheckpointError, match=r"holds step 110 .*start over at step 0.*ignore_damaged=true"):
        train(_config(tmp_path, corpus, "train.steps=12"))
    summary = train(_config(tmp_path, corpus, "train.steps=2", "checkpoint.ignore_damaged=true"))
    assert summary["step"] == 2


def test_the_echoes_of_a_failed_read_do_not_flood_the_log(base_run, tmp_path, corpus, caplog,  # noqa: F811
                                                          capsys):
    # Orbax reads arrays in asyncio tasks; when one fails, the others' failures are never retrieved
    # and asyncio logs each with its traceback as the tasks are collected (thousands of lines, seen
    # with a zeroed state file), after the one warning that already said the checkpoint is damaged.
    workdir = _copy_run(base_run, tmp_path)
    assert _truncate_state_files(workdir / "checkpoints" / "8") > 0
    config = _config(tmp_path, corpus)
    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", config.checkpoint, read_only=True)
    with pytest.raises(ckpt.DamagedCheckpointError) as raised:
        checkpointer.restore(8, loop.build(config, with_data=False).abstract_state)
    checkpointer.close()
    echo = raised.value.__cause__
    caplog.clear()
    asyncio_log = logging.getLogger("asyncio")
    for kind in ("Task", "_GatheringFuture"):
        asyncio_log.error(f"{kind} exception was never retrieved\nfuture: <{kind} finished>",
                          exc_info=(type(echo), echo, echo.__traceback__))
    assert not caplog.records
    capsys.readouterr()
    bare = Exception("Encountered error while reading array index: (slice(0, 64, 1),). See full TensorStore details")
    for error in (echo, bare):  # a coroutine closed by the collector keeps Orbax's error without its cause
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None,
                                                 err_msg="Exception ignored in", object=None))
    assert capsys.readouterr().err == ""
    other = ValueError("something else")
    asyncio_log.error("Task exception was never retrieved\nfuture: <Task finished>", exc_info=(ValueError, other, None))
    asyncio_log.error("Unclosed client session")
    assert len(caplog.records) == 2  # what is not a failed checkpoint read still gets through


@pytest.mark.parametrize("damage", [None, "{}", "[1]", '{"format": 1}'])
def test_a_checkpoint_missing_its_data_file_is_set_aside_like_any_damage(base_run, tmp_path, corpus,  # noqa: F811
                                                                         damage):
    # grain words a missing data state file as a plain ValueError; a file that is JSON but holds no
    # position fails in the data module: both are damaged checkpoints.
    workdir = _copy_run(base_run, tmp_path)
    data_file = workdir / "checkpoints" / "8" / "data" / "process_0-of-1.json"
    data_file.unlink() if damage is None else data_file.write_text(damage)
    summary = train(_config(tmp_path, corpus, "train.steps=10", "checkpoint.every=4"))
    assert summary["step"] == 10
    assert [p.name.split("-")[0] for p in (workdir / DAMAGED).iterdir()] == ["8"]
    rows = [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]
    assert rows[-2:] == [5, 10] and rows.count(5) == 2  # resumed after step 4, not from scratch


@pytest.mark.parametrize("garbled", ['{}', '[1, 2]', '{"step": "x"}', '{"step": 8, "nonfinite_steps": null}',
                                     '{"step": 8, "config": [1]}'])
def test_metadata_that_is_json_but_not_ours_is_damage(base_run, tmp_path, corpus, garbled):  # noqa: F811
    # Readable JSON that is not what a save writes crashed the resume with a KeyError/TypeError, every time.
    workdir = _copy_run(base_run, tmp_path)
    (workdir / "checkpoints" / "8" / "metadata" / "metadata").write_text(garbled)
    summary = train(_config(tmp_path, corpus, "train.steps=10", "checkpoint.every=4"))
    assert summary["step"] == 10
    assert [p.name.split("-")[0] for p in (workdir / DAMAGED).iterdir()] == ["8"]


def test_when_every_checkpoint_is_damaged_the_run_does_not_start_over(base_run, tmp_path, corpus):  # noqa: F811
    workdir = _copy_run(base_run, tmp_path)
    for step in (4, 8):
        assert _truncate_state_files(workdir / "checkpoints" / str(step)) > 0
    with pytest.raises(ckpt.CheckpointError, match="set checkpoint.ignore_damaged=true"):
        train(_config(tmp_path, corpus, "train.steps=10"))
    assert _checkpoint_steps(workdir) == []  # both set aside, kept
    assert len(list((workdir / DAMAGED).iterdir())) == 2
    with pytest.raises(ckpt.CheckpointError, match="holds step 8"):  # the rerun says so again
        train(_config(tmp_path, corpus, "train.steps=10"))


def test_clip_norm_compute_settings_and_the_data_may_change_on_resume(tmp_path, corpus, caplog):  # noqa: F811
    run = ["train.steps=4", "optimizer.clip_norm=0", "checkpoint.every=4"]
    train(_config(tmp_path, corpus, *run))
    caplog.set_level(logging.INFO, logger="llm_jax")
    summary = train(_config(tmp_path, corpus, "train.steps=6", "optimizer.clip_norm=1.0", "model.dtype=bfloat16",
                            "model.remat=full", f"data.path={corpus}/doc0*.txt"))
    assert summary["step"] == 6 and "resumed from step 4" in caplog.text
    assert re.search(r"the data changed since step 4: data.path '\S*/\*.txt' -> '\S*/doc0\*.txt'", caplog.text)
    # and back: a checkpoint saved with clipping restores into a run without it
    config = _config(tmp_path, corpus, "optimizer.clip_norm=0")
    reader = ckpt.Checkpointer(tmp_path / "run" / "checkpoints", config.checkpoint, read_only=True)
    _, metadata = reader.restore_latest(loop.build(config, with_data=False).abstract_state, None)
    reader.close()
    assert metadata["step"] == 6


def test_a_changed_seed_or_seq_len_resumes_with_a_warning(base_run, tmp_path, corpus, caplog):  # noqa: F811
    # Both change which documents follow the saved data position (the shuffle order, the pieces counted
    # in it): allowed, but an uninterrupted run would have seen other batches, so it is said.
    _copy_run(base_run, tmp_path)
    caplog.set_level(logging.INFO, logger="llm_jax")
    summary = train(_config(tmp_path, corpus, "train.steps=10", "seed=5", "train.seq_len=16"))
    assert summary["step"] == 10 and "resumed from step 8" in caplog.text
    assert "the data changed since step 8: seed 0 -> 5, train.seq_len 32 -> 16" in caplog.text


def test_eval_restores_read_only_with_the_same_rules(base_run, tmp_path):  # noqa: F811
    workdir = _copy_run(base_run, tmp_path)
    before = _files(workdir / "checkpoints")
    _, params, step = loop.restore_for_inference(workdir)
    _, scanned, scanned_step = loop.restore_for_inference(workdir, ["model.scan_layers=true"])
    assert step == scanned_step == 8
    np.testing.assert_array_equal(scanned["layers"]["mlp"]["fc"]["kernel"][1], params["layer_1"]["mlp"]["fc"]["kernel"])
    with pytest.raises(ConfigError, match="does not fit this config: params/embed/embedding"):
        loop.restore_for_inference(workdir, ["model.d_model=32"])
    assert _files(workdir / "checkpoints") == before and not (workdir / DAMAGED).exists()


def test_a_reader_beside_a_training_run_reads_the_newest_again_when_its_checkpoint_is_pruned(base_run, tmp_path):
    # eval, generate and export are safe beside a training run, which saves a newer checkpoint and
    # deletes the oldest one while they read: that is neither damage nor a storage error.
    workdir = _copy_run(base_run, tmp_path)
    config = loop.restore_for_inference(workdir)[0].config
    reader = ckpt.Checkpointer(workdir / "checkpoints", config.checkpoint, read_only=True)
    read, item_metadata = [], reader.manager.item_metadata

    def training_run_beside(step):
        read.append(step)
        if step == 8 and len(read) == 1:  # step 12 is saved, and 8, the oldest kept, deleted
            shutil.copytree(workdir / "checkpoints" / "8", workdir / "checkpoints" / "12")
            saved = workdir / "checkpoints" / "12" / "metadata" / "metadata"
            saved.write_text(json.dumps({**json.loads(saved.read_text()), "step": 12}))
            shutil.rmtree(workdir / "checkpoints" / "8")
        return item_metadata(step)

    reader.manager.item_metadata = training_run_beside
    state, _ = reader.restore_latest(loop.build(config, with_data=False).abstract_state)
    reader.close()
    assert read[0] == 8 and read[-1] == 12 and state.params is not None
    assert not (workdir / DAMAGED).exists()


def test_init_from_an_unrolled_export_into_scanned_layers(base_run, tmp_path, corpus):  # noqa: F811
    out = tmp_path / "exported"
    export_run(base_run / "run", out)
    config = _config(tmp_path, corpus, "model.scan_layers=true")
    params = ckpt.load_exported_params(out, config.model, loop.build(config, with_data=False).abstract_state.params)
    _, unrolled, _ = loop.restore_for_inference(base_run / "run")
    np.testing.assert_array_equal(params["layers"]["attn"]["query"]["kernel"][0],
                                  unrolled["layer_0"]["attn"]["query"]["kernel"])


def test_init_from_compares_the_model_keys_by_what_they_resolve_to(tmp_path):
    # Only the export's config.yaml is read before any work: a stand-in export is enough.
    from llm_jax.config import dump_config, load_config

    export = tmp_path / "export"
    (export / ckpt.EXPORT_PARAMS).mkdir(parents=True)
    dump_config(load_config("configs/tiny.yaml", ["model.arch=t5"]), export / ckpt.EXPORT_CONFIG)

    def config(*overrides):
        return load_config("configs/tiny.yaml", ["model.arch=t5", f"init_from={export}", *overrides])

    # Spelling out what the export left to its default (n_layers 2, the family's position) is the same model.
    ckpt.check_init_from(config("model.n_encoder_layers=2", "model.n_decoder_layers=2", "model.position=relative",
                                "model.gated_mlp=true", "model.n_kv_heads=4"))
    with pytest.raises(ConfigError, match=r"model.n_decoder_layers=2, not 1;"):  # numbers, not None
        ckpt.check_init_from(config("model.n_decoder_layers=1"))
