"""Two local processes with two CPU devices each, joined by jax.distributed on 127.0.0.1, follow a
one-process four-device run of the same global batches step by step, in both parallel modes."""

import json
import subprocess
import sys

import pytest
from multiprocess import REPO, launch, process_env, wait_all
from test_trainer import corpus  # noqa: F401 - the corpus fixture

from llm_jax.train.metrics import read_metrics

STEPS = 6


def _args(tmp_path, corpus, mode: str, steps: int) -> list[str]:  # noqa: F811
    mesh = ["mesh.data=2", "mesh.fsdp=2"] if mode == "jit" else ["mesh.data=-1"]
    return ["configs/tiny.yaml", f"workdir={tmp_path / mode}", "data.source=text", f"data.path={corpus}/*.txt",
            f"data.prepared_dir={tmp_path / 'prepared'}", "model.vocab_size=300", "tokenizer.sample_bytes=100000",
            "train.progress=false", "train.seq_len=32", "train.batch_size=8", f"train.steps={steps}",
            "train.log_every=1", "train.eval_every=1000", "checkpoint.every=3", "optimizer.lr=3e-3",
            "optimizer.warmup_steps=2", "train.sample_tokens=4", f"parallel.mode={mode}", *mesh]


def _train_two_processes(args: list[str]) -> list[str]:
    results = wait_all(launch(["train", *args], num_processes=2, devices_per_process=2), timeout=300)
    for pid, (rc, output) in enumerate(results):
        assert rc == 0, f"process {pid} exited {rc}:\n{output[-3000:]}"
    return [output for _, output in results]


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_two_processes_match_one_process(tmp_path, corpus, mode):  # noqa: F811
    outputs = _train_two_processes(_args(tmp_path, corpus, mode, STEPS))
    workdir = tmp_path / mode
    rows = [r for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # process 0 alone writes metrics
    assert "eval loss" in outputs[0] and "eval loss" not in outputs[1]
    assert "per-device bytes" in outputs[0] and "per-device bytes" not in outputs[1]  # one log, process 0's
    assert sorted(p.name for p in (workdir / "checkpoints" / str(STEPS) / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]  # every process saved its data position

    reference = subprocess.run(
        [sys.executable, str(REPO / "tests" / "multiprocess_reference.py"), "2", str(STEPS),
         *_args(tmp_path, corpus, mode, STEPS)],
        capture_output=True, text=True, env=process_env(4), cwd=REPO, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads(reference.stdout.strip().splitlines()[-1])
    assert expected[-1] < expected[0]  # it learns: a trajectory worth comparing
    for step, (want, got) in enumerate(zip(expected, [r["loss"] for r in rows], strict=True), start=1):
        assert got == pytest.approx(want, rel=1e-5), f"step {step}"

    if mode == "jit":  # the run continues as one process on four devices: state and data position restored
        command = [sys.executable, "-m", "llm_jax.cli", "train", *_args(tmp_path, corpus, mode, STEPS + 2)]
        single = subprocess.run(command, capture_output=True, text=True, env=process_env(4), cwd=REPO, timeout=300)
        assert single.returncode == 0, single.stderr[-3000:]
        assert f"resumed from step {STEPS}" in single.stderr
        rows = [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]
        assert rows == list(range(1, STEPS + 3))
