"""The same training whatever the number of processes: command-line runs of several local processes
(joined by jax.distributed on 127.0.0.1, fake CPU devices each) against one process holding all the
devices, same seed, step by step; and runs resumed on another process count."""

import subprocess
import sys
import tempfile

import pytest
from pod_processes import REPO, launch, process_env, wait_all
from test_trainer import corpus  # noqa: F401 - the corpus fixture

from llm_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # collected first (conftest.py)

STEPS = 6  # the first run's length; a resumed run goes on to STEPS + 2


def _args(root, corpus, name: str, steps: int, *extra: str) -> list[str]:  # noqa: F811
    # A fixed schedule (decay_steps), so that stopping at STEPS changes nothing about the steps before.
    return ["configs/tiny.yaml", f"workdir={root / name}", "data.source=text", f"data.path={corpus}/*.txt",
            f"data.prepared_dir={root / 'prepared'}", "model.vocab_size=300", "tokenizer.sample_bytes=100000",
            "train.progress=false", "train.seq_len=32", "train.batch_size=8", f"train.steps={steps}",
            "train.log_every=1", "train.eval_every=1000", "checkpoint.every=1000", "optimizer.lr=3e-3",
            "optimizer.warmup_steps=2", f"optimizer.decay_steps={STEPS + 2}", "train.sample_tokens=4", *extra]


def _start(args: list[str], processes: int, devices: int) -> list[subprocess.Popen]:
    """Starts `llm-jax train` as `processes` processes of `devices` fake CPU devices each."""
    if processes == 1:
        log = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen([sys.executable, "-m", "llm_jax.cli", "train", *args], env=process_env(devices),
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        proc.log = log
        return [proc]
    return launch(["train", *args], num_processes=processes, devices_per_process=devices)


def _train(args: list[str], processes: int, devices: int) -> list[str]:
    """Runs `llm-jax train` as `processes` processes of `devices` fake CPU devices each; their outputs."""
    return _side_by_side((args, processes, devices))[0]


def _side_by_side(*runs: tuple[list[str], int, int]) -> list[list[str]]:
    """Runs independent jobs (args, processes, devices) at the same time; the outputs of each.

    A job's processes spend most of their time compiling: started together, two jobs share the
    machine's cores instead of waiting for each other. Every process is waited for (or killed
    past the timeout) before any return code is checked."""
    results = [wait_all(procs, timeout=300) for procs in [_start(*run) for run in runs]]
    for job in results:
        for pid, (rc, output) in enumerate(job):
            assert rc == 0, f"process {pid} exited {rc}:\n{output[-3000:]}"
    return [[output for _, output in job] for job in results]


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r}


def _assert_same_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
    assert list(got) == list(steps), sorted(got)
    rel = {step: abs(got[step] - want[step]) / abs(want[step]) for step in steps}
    worst = max(rel, key=rel.get)
    assert rel[worst] <= 1e-5, f"step {worst}: {got[worst]} != {want[worst]} (max rel diff {rel[worst]:.3g})"


@pytest.mark.parametrize("mesh, whole, split", [
    # (data=2, fsdp=2), each process holding its own rows: 2 processes x 2 devices against 1 x 4, and a
    # run stopped on 2 processes resumed on 1.
    (["mesh.data=2", "mesh.fsdp=2"], (1, 4), (2, 2)),
    # One process per device with tensor=2, the two processes holding the same rows: against one
    # process with both devices, and a run stopped on 1 process resumed on 2.
    (["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=2"], (2, 1), (1, 2)),
    # The encoder: masked-LM batches (masks drawn per data position) on 2 processes, resumed on 1.
    (["mesh.data=2", "mesh.fsdp=2", "model.arch=bert"], (1, 4), (2, 2)),
    # The encoder-decoder: span-corrupted batches of two lengths on 2 processes, resumed on 1; 10
    # sentinels fit the tiny vocabulary.
    (["mesh.data=2", "mesh.fsdp=2", "model.arch=t5", "tokenizer.extra_ids=10"], (1, 4), (2, 2)),
])
def test_the_process_count_changes_nothing_even_on_resume(tmp_path, corpus, mesh, whole, split):  # noqa: F811
    """An uninterrupted run on one layout; on the other, a run stopped at STEPS, resumed on the first."""
    # The first two runs are independent jobs, in workdirs of their own: side by side.
    _, outputs = _side_by_side((_args(tmp_path, corpus, "whole", STEPS + 2, *mesh), *whole),
                               (_args(tmp_path, corpus, "split", STEPS, *mesh), *split))
    expected = _losses(tmp_path / "whole")
    assert expected[STEPS + 2] < expected[1]  # it learns: a trajectory worth comparing

    if len(outputs) > 1:
        assert "per-device bytes" in outputs[0] and "per-device bytes" not in outputs[1]  # one log, process 0's
    data_dir = tmp_path / "split" / "checkpoints" / str(STEPS) / "data"
    assert sorted(p.name for p in data_dir.glob("process_*")) == [
        f"process_{p}-of-{split[0]}.json" for p in range(split[0])]  # every process saved its data position
    _assert_same_losses(_losses(tmp_path / "split"), expected, range(1, STEPS + 1))

    resumed = _train(_args(tmp_path, corpus, "split", STEPS + 2, *mesh), *whole)
    assert f"resumed from step {STEPS}" in resumed[0]
    _assert_same_losses(_losses(tmp_path / "split"), expected, range(1, STEPS + 3))


def test_pmap_two_processes_train_like_one(tmp_path, corpus):  # noqa: F811
    mesh = ["parallel.mode=pmap", "mesh.data=-1"]
    _side_by_side((_args(tmp_path, corpus, "one", STEPS, *mesh), 1, 4),  # independent jobs
                  (_args(tmp_path, corpus, "two", STEPS, *mesh), 2, 2))
    _assert_same_losses(_losses(tmp_path / "two"), _losses(tmp_path / "one"), range(1, STEPS + 1))
