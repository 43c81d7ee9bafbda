"""One training run per workdir: a second run refuses before touching anything, a killed run's lock
does not block the next one, and the processes of one multi-process job refuse together."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pod_processes
import pytest
from test_fault_tolerance import _checkpoint_steps, _cli_args, _train_rows
from test_trainer import _config, corpus  # noqa: F401 - the corpus fixture

from llm_jax.train import run_lock
from llm_jax.train.loop import train

ROOT = Path(__file__).parent.parent


def _files(workdir: Path) -> dict[str, tuple[int, bytes]]:
    """The files a second run would write first, config.yaml and the tokenizer: (mtime, content).

    Only these: the first run is meanwhile writing checkpoints, whose temporary directories come and
    go while a walk of the whole run directory is under way."""
    paths = [workdir / "config.yaml", *sorted((workdir / "tokenizer").glob("*"))]
    return {str(p.relative_to(workdir)): (p.stat().st_mtime_ns, p.read_bytes()) for p in paths if p.is_file()}


def _start(tmp_path, corpus, *extra):  # noqa: F811
    return subprocess.Popen([sys.executable, "-m", "llm_jax.cli", *_cli_args(tmp_path, corpus, *extra)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(proc, workdir: Path, rows: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and len(_train_rows(workdir)) < rows:
        time.sleep(0.1)
    assert proc.poll() is None and len(_train_rows(workdir)) >= rows


def test_a_second_run_on_a_busy_workdir_exits_2_and_the_first_finishes_untouched(tmp_path, corpus):  # noqa: F811
    workdir = tmp_path / "run"
    # Slow enough (a checkpoint every step, each waited for) that the second run starts mid-way.
    first = _start(tmp_path, corpus, "train.steps=30", "train.log_every=1", "checkpoint.every=1",
                   "checkpoint.keep=100", "checkpoint.async_save=false")
    _wait_for_rows(first, workdir, 3)
    before = _files(workdir)
    second = subprocess.run([sys.executable, "-m", "llm_jax.cli",
                             *_cli_args(tmp_path, corpus, "train.steps=50", "train.log_every=1")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another training run" in lines[0], second.stderr[-3000:]
    assert f"pid {first.pid} on host" in lines[0]
    assert first.poll() is None, "the first run must still be going"
    # The second run wrote nothing: config.yaml (train.steps=50 there would show), tokenizer, metrics.
    after = _files(workdir)
    assert "config.yaml" in before and len(before) > 1
    assert after == before
    assert json.loads((workdir / run_lock.LOCK_NAME).read_text())["pid"] == first.pid

    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert [r["step"] for r in _train_rows(workdir)] == list(range(1, 31))  # one run's lines, once each
    assert _checkpoint_steps(workdir) == list(range(1, 31))


def test_a_killed_runs_lock_does_not_block_the_next_run(tmp_path, corpus):  # noqa: F811
    workdir = tmp_path / "run"
    proc = _start(tmp_path, corpus, "train.steps=100000", "train.log_every=1", "checkpoint.every=5")
    _wait_for_rows(proc, workdir, 6)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert json.loads((workdir / run_lock.LOCK_NAME).read_text())["pid"] == proc.pid  # left behind, stale
    summary = train(_config(tmp_path, corpus, "train.steps=8", "train.log_every=1"))
    assert summary["step"] == 8


def test_the_lock_is_refused_within_one_process_and_free_after_the_run(tmp_path):
    fd = run_lock.acquire(tmp_path / "run")
    with pytest.raises(run_lock.WorkdirBusy, match=f"pid {os.getpid()} on host"):
        run_lock.acquire(tmp_path / "run")
    run_lock.release(fd)
    run_lock.release(run_lock.acquire(tmp_path / "run"))


def test_both_processes_of_a_job_exit_2_when_the_workdir_is_busy(tmp_path, corpus):  # noqa: F811
    fd = run_lock.acquire(tmp_path / "run")  # another run holds it: this test process
    try:
        procs = pod_processes.launch(_cli_args(tmp_path, corpus, "train.steps=5"), num_processes=2,
                                    devices_per_process=1)
        results = pod_processes.wait_all(procs, timeout=180)  # a process left waiting would time out here
    finally:
        run_lock.release(fd)
    for returncode, output in results:
        assert returncode == 2, output[-3000:]
    assert "in use by another training run" in results[0][1]
    assert "process 0 could not take the run's lock" in results[1][1]
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
