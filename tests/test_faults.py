"""Faults of the machine end in one line and a non-zero exit, and lose nothing: a full disk, a
read-only workdir, a file where the checkpoints folder should be, a damaged tokenizer or prepared
dataset, a killed preparation, and a signal during start-up."""

import errno
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import orbax.checkpoint as ocp
import pytest
import sentencepiece as spm
from test_fault_tolerance import _checkpoint_steps, _cli_args
from test_trainer import _config, corpus  # noqa: F401 - the corpus fixture

from llm_jax import cli
from llm_jax.data import corpus as corpus_lib
from llm_jax.data import pipeline as data_lib
from llm_jax.data import tfds_builder
from llm_jax.runtime.stop_signal import StartupInterrupted, StopSignal
from llm_jax.train import loop

ROOT = Path(__file__).parent.parent
# What tensorstore (under Orbax) raises when a checkpoint write finds the disk full.
DISK_FULL = ('RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file "{dir}/": Failed '
             'writing: "{dir}/d/be91": Failed to write 41004 bytes to file 11: No space left on device '
             "[os_error_code='28']")


def _error_lines(stderr: str) -> list[str]:
    """What the command itself says on stderr (the log and TFDS's progress bars aside); no traceback."""
    assert "Traceback" not in stderr, stderr[-5000:]
    return [line for line in stderr.strip().splitlines() if line.startswith("llm-jax")]


def _last_line(stderr: str) -> str:
    """The one line of an in-process run (TFDS progress bars come before it); no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


def _run(tmp_path, corpus, *extra, timeout=300):  # noqa: F811
    return subprocess.run([sys.executable, "-m", "llm_jax.cli", *_cli_args(tmp_path, corpus, *extra)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- one line for any layer


@pytest.mark.parametrize("error, fragment", [
    (OSError(errno.EROFS, "Read-only file system", "/runs/a/config.yaml"),
     "Read-only file system: /runs/a/config.yaml; the file system is read-only"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/a/metrics.jsonl"),
     "Permission denied: /runs/a/metrics.jsonl; no permission"),
    (ValueError(DISK_FULL.format(dir="/runs/a/checkpoints/5.orbax-checkpoint-tmp/state")),
     "No space left on device: /runs/a/checkpoints/5.orbax-checkpoint-tmp/state/d/be91; free some space"),
    (RuntimeError("wrapped"), None),  # its cause below is the machine's
])
def test_a_fault_of_the_machine_in_any_layer_is_one_line_and_exit_2(monkeypatch, capsys, error, fragment):
    if fragment is None:
        error.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/runs/a/x")
        fragment = "No space left on device: /runs/a/x"

    def fail(config):
        raise error

    monkeypatch.setattr(loop, "train", fail)
    assert cli.main(["train", "train.steps=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"llm-jax train: error: {fragment}"), err


def test_an_error_that_is_not_the_machines_still_shows_its_traceback(monkeypatch):
    def fail(config):
        raise ValueError("a bug")

    monkeypatch.setattr(loop, "train", fail)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["train", "train.steps=5"])


def test_a_disk_full_during_a_save_names_the_step_and_keeps_the_earlier_checkpoints(tmp_path, corpus,  # noqa: F811
                                                                                    monkeypatch, capsys):
    save = ocp.CheckpointManager.save

    def fill_disk_at_step_4(self, step, *args, **kwargs):
        if step == 4:
            raise ValueError(DISK_FULL.format(dir=f"{self.directory}/4.orbax-checkpoint-tmp/state"))
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", fill_disk_at_step_4)
    assert cli.main(_cli_args(tmp_path, corpus, "train.steps=6", "checkpoint.every=2")) == 2
    err = _last_line(capsys.readouterr().err)
    assert err.startswith("llm-jax train: error: checkpoint 4 could not be saved: No space left on device"), err
    assert err.endswith("the checkpoints saved before it are kept (steps: 2)")
    assert _checkpoint_steps(tmp_path / "run") == [2]
    # The writes the failed save left unawaited are collected at exit: Python's warning about each
    # ('sys:1: RuntimeWarning: coroutine ... was never awaited', then a tracemalloc hint) stays quiet.
    with warnings.catch_warnings(record=True) as shown:
        warnings.warn("coroutine 'async_serialize_from_host.<locals>.write_fragment' was never awaited",
                      RuntimeWarning, stacklevel=1)
        warnings.warn("something else", RuntimeWarning, stacklevel=1)
    assert [str(w.message) for w in shown] == ["something else"]


def test_a_file_where_the_checkpoints_folder_should_be_stops_the_run_before_training(tmp_path, corpus,  # noqa: F811
                                                                                     capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a folder\n")
    assert cli.main(_cli_args(tmp_path, corpus, "train.steps=3")) == 2
    assert _last_line(capsys.readouterr().err) == (
        f"llm-jax train: error: Not a directory: {tmp_path / 'run' / 'checkpoints'}; a file stands where a folder "
        "is needed: move it away or use another path")
    assert (tmp_path / "run" / "checkpoints").read_text() == "not a folder\n"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before the first step


# ----------------------------------------------------------------------------- damaged files


def test_a_damaged_tokenizer_is_named_with_its_fix_and_deleting_it_trains_the_same_one(tmp_path, corpus,  # noqa: F811
                                                                                        capsys):
    loop.train(_config(tmp_path, corpus, "train.steps=2", "checkpoint.every=2"))
    model = tmp_path / "run" / "tokenizer" / "spm.model"
    good = model.read_bytes()
    model.write_bytes(good[: len(good) // 2])  # a copy cut short
    assert cli.main(_cli_args(tmp_path, corpus, "train.steps=4")) == 2
    err = _last_line(capsys.readouterr().err)
    assert f"error: the run's tokenizer {model} is damaged" in err and "delete it" in err, err
    assert _checkpoint_steps(tmp_path / "run") == [2]

    model.unlink()  # the fix the message gives: the same tokenizer comes back, the run resumes
    assert loop.train(_config(tmp_path, corpus, "train.steps=4"))["step"] == 4
    assert _pieces(model.read_bytes()) == _pieces(good)  # the same ids (the file also holds its temp folder name)


def _pieces(model: bytes) -> list[str]:
    sp = spm.SentencePieceProcessor(model_proto=model)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def _prepared_dir(tmp_path, corpus) -> Path:  # noqa: F811
    config = _config(tmp_path, corpus)
    return tfds_builder.prepared_data_dir(corpus_lib.find_corpus(config.data), config.data.prepared_dir)


def test_a_damaged_prepared_dataset_is_prepared_again(tmp_path, corpus, caplog):  # noqa: F811
    config = _config(tmp_path, corpus)
    documents = list(data_lib.open_sources(config).train[i] for i in range(39))
    (shard,) = _prepared_dir(tmp_path, corpus).glob("*/1.0.0/*-train.array_record-*")
    shard.write_bytes(shard.read_bytes()[:100_000])  # what a full disk or a cut copy leaves
    caplog.set_level(logging.WARNING, logger="llm_jax.data.tfds_builder")
    sources = data_lib.open_sources(config)
    assert "is damaged" in caplog.text and "preparing it again" in caplog.text
    assert [sources.train[i] for i in range(len(sources.train))] == documents


def test_a_killed_preparation_leaves_no_incomplete_folder_behind(tmp_path, corpus):  # noqa: F811
    data_dir = _prepared_dir(tmp_path, corpus)
    # What SIGKILL during `data prepare` leaves: TFDS's temporary folder, never renamed.
    leftover = data_dir / "llm_jax_local_corpus" / "incomplete.ab12cd_1.0.0"
    leftover.mkdir(parents=True)
    (leftover / "llm_jax_local_corpus-train.array_record-00000-of-00001").write_bytes(b"\0" * 1000)
    sources = data_lib.open_sources(_config(tmp_path, corpus))
    assert len(sources.train) == 39
    assert not leftover.exists()
    assert [p.name for p in (data_dir / "llm_jax_local_corpus").iterdir()] == ["1.0.0"]


def test_data_prepare_killed_midway_leaves_no_incomplete_folder_after_the_next_run(tmp_path):
    big = tmp_path / "big"  # large enough that the preparation takes a while to write
    big.mkdir()
    for i in range(1500):
        (big / f"doc{i:04d}.txt").write_text(f"document {i} " + "the cat sat on the mat " * 150 + "\n")
    args = ["data", "prepare", "configs/tiny.yaml", f"workdir={tmp_path / 'run'}", "data.source=text",
            f"data.path={big}/*.txt", f"data.prepared_dir={tmp_path / 'prepared'}", "model.vocab_size=300",
            "tokenizer.sample_bytes=100000", "train.progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "llm_jax.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((tmp_path / "prepared").glob("*/*/incomplete.*")):
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert list((tmp_path / "prepared").glob("*/*/incomplete.*")), "the kill came too late to test anything"
    done = subprocess.run([sys.executable, "-m", "llm_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list((tmp_path / "prepared").glob("*/*/incomplete.*"))
    assert [p.name for p in (tmp_path / "prepared").glob("*/*/*")] == ["1.0.0"]


def test_a_full_disk_under_metrics_jsonl_names_the_file(tmp_path):
    # A buffered write's OSError carries no file name: the one line said only "No space left on device".
    from llm_jax.runtime import faults
    from llm_jax.train.metrics import MetricsWriter

    class FullDisk:
        def write(self, text=None):
            raise OSError(errno.ENOSPC, "No space left on device")

        close = write

    writer = MetricsWriter(tmp_path)
    writer._jsonl.close()
    writer._jsonl = FullDisk()
    with pytest.raises(OSError) as raised:
        writer.write(1, {"loss": 1.0})
    assert faults.describe(raised.value).startswith(f"No space left on device: {tmp_path / 'metrics.jsonl'}; free")
    with pytest.raises(OSError, match="metrics.jsonl"):
        writer.close()
    writer.close()  # closed once, even though the last flush failed: nothing left to raise

    # TensorBoard's final flush fails the same way: named too, and its event thread is stopped (left
    # running, it died at exit with an 'OSError: handle is closed' traceback under the one line).
    writer = MetricsWriter(tmp_path)
    writer.write(1, {"loss": 1.0})
    (file_writer,) = writer._tb.all_writers.values()
    thread = file_writer.event_writer._worker
    record_writer = file_writer.event_writer._ev_writer
    flush, record_writer.flush = record_writer.flush, FullDisk().write
    with pytest.raises(OSError) as raised:
        writer.close()
    record_writer.flush = flush  # the disk has room again for the file's own close at exit
    assert raised.value.filename == str(tmp_path / "tensorboard") and not thread.is_alive()


# ----------------------------------------------------------------------------- signals during start-up


def test_a_signal_during_start_up_ends_at_once_and_a_second_sigint_interrupts():
    with StopSignal() as stop:
        with pytest.raises(StartupInterrupted, match="during start-up.*nothing lost"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    with StopSignal():  # the command line's
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except StartupInterrupted:
            pass  # swallowed where it landed, as a garbage-collector callback does
        with StopSignal() as stop:  # the trainer's: the request is kept, and honoured as the loop starts
            with pytest.raises(StartupInterrupted, match="stopped by SIGTERM during start-up"):
                stop.running()
    with StopSignal() as stop:
        stop.running()  # in the loop: the step finishes, then the run saves and stops
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_exits_0_with_one_line(tmp_path, corpus, sig):  # noqa: F811
    proc = subprocess.Popen([sys.executable, "-m", "llm_jax.cli", *_cli_args(tmp_path, corpus, "train.steps=50")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (tmp_path / "run").exists():
        time.sleep(0.01)  # the run directory appears early in the start-up
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert _error_lines(err) == [f"llm-jax train: stopped by {sig.name} during start-up, before the first step: "
                                 "nothing to save, nothing lost; run the same command to start again"], err[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists() or not _checkpoint_steps(tmp_path / "run")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_xla_compiles_exits_0_not_in_a_segfault(tmp_path, corpus, sig):  # noqa: F811
    # The signal interrupts JAX's wait for the compilation of the initial state, which goes on in
    # XLA's threads; the interpreter's exit then destroyed JAX's client under it: exit code 139
    # (a segmentation fault) after the line that says nothing was lost.
    proc = subprocess.Popen([sys.executable, "-m", "llm_jax.cli", *_cli_args(tmp_path, corpus, "train.steps=50")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_LOG_COMPILES": "1"})
    seen = []
    for line in proc.stderr:  # JAX logs this before XLA compiles the initial state (a second or more)
        seen.append(line)
        if "Compiling jit(fresh_state)" in line:
            time.sleep(0.1)  # past the Python that still runs before JAX waits on XLA's compilation
            proc.send_signal(sig)
            break
    _, err = proc.communicate(timeout=60)
    err = "".join(seen) + err
    assert "Compiling jit(fresh_state)" in err, err[-3000:]
    assert proc.returncode == 0, err[-3000:]
    assert _error_lines(err) == [f"llm-jax train: stopped by {sig.name} during start-up, before the first step: "
                                 "nothing to save, nothing lost; run the same command to start again"], err[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_command_line_imports_jax_is_one_line_too(monkeypatch, capsys, sig):
    # main imports JAX (to tune malloc for the CPU) before the train command runs: a second or so in
    # which a Ctrl-C ended in a KeyboardInterrupt traceback, and a SIGTERM killed the run silently.
    from llm_jax.kernels import host_memory

    def imports_jax():
        os.kill(os.getpid(), sig)
        time.sleep(0.2)  # the handler runs at the next bytecode; an import is not cut short (see StopSignal)

    monkeypatch.setattr(host_memory, "tune_malloc_for_xla_cpu", imports_jax)
    assert cli.main(["train", "train.steps=1"]) == 0
    assert _error_lines(capsys.readouterr().err) == [
        f"llm-jax train: stopped by {sig.name} during start-up, before the first step: nothing to save, "
        "nothing lost; run the same command to start again"]


# ----------------------------------------------------------------------------- a real small disk


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: room for the tokenizer and two tiny checkpoints, not three. Needs mount rights."""
    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root); the injected disk-full test covers the wording")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def test_a_full_disk_ends_in_one_line_and_the_run_resumes_once_there_is_room(small_disk, corpus):  # noqa: F811
    args = ("train.steps=20", "checkpoint.every=5", "checkpoint.keep=10", "train.log_every=5")
    full = _run(small_disk, corpus, *args)
    assert full.returncode == 2, full.stderr[-3000:]
    lines = _error_lines(full.stderr)
    # Which write meets the full disk first (a checkpoint, metrics.jsonl, the event file) depends on
    # timing; whichever it is, the run ends in one line naming it.
    assert len(lines) == 1 and "No space left on device" in lines[0], full.stderr[-5000:]
    kept = _checkpoint_steps(small_disk / "run")
    assert kept and kept[-1] < 20, kept
    if "could not be saved" in lines[0]:
        assert f"the checkpoints saved before it are kept (steps: {', '.join(map(str, kept))})" in lines[0]

    _remount(small_disk, "size=64m")
    done = _run(small_disk, corpus, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from step {kept[-1]}" in done.stderr
    assert _checkpoint_steps(small_disk / "run")[-1] == 20
    assert not [p for p in (small_disk / "run" / "checkpoints").iterdir() if "tmp" in p.name]


def test_a_read_only_workdir_ends_in_one_line_and_keeps_its_checkpoints(small_disk, corpus):  # noqa: F811
    _remount(small_disk, "size=64m")
    assert _run(small_disk, corpus, "train.steps=4", "checkpoint.every=2").returncode == 0
    files = {p: p.read_bytes() for p in (small_disk / "run").rglob("*") if p.is_file()}
    _remount(small_disk, "ro")
    result = _run(small_disk, corpus, "train.steps=8", "checkpoint.every=2")
    assert result.returncode == 2, result.stderr[-3000:]
    assert _error_lines(result.stderr) == [
        f"llm-jax train: error: Read-only file system: {small_disk / 'run' / 'run.lock'}; the file system is "
        "read-only: make it writable or use another workdir"], result.stderr[-3000:]
    assert {p: p.read_bytes() for p in (small_disk / "run").rglob("*") if p.is_file()} == files
