"""The command line as a user meets it: exit codes and one-line errors, in a real subprocess."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest

from llm_jax.cli import main


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llm_jax.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_typo_in_a_key_exits_2_with_one_line():
    result = _run("train", "model.n_layrs=2")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "model.n_layers" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["train", "no_such.yaml"], "not found"),
    (["train", "model.d_model=100", "model.n_heads=3"], "divisible"),
    (["train", "train.batch_size=6", "optimizer.grad_accum=4"], "grad_accum"),
    (["eval", "/no/such/run"], "not a run directory"),
    # Overrides after an option are the command's overrides too, not unrecognized arguments.
    (["plan", "configs/t5_base.yaml", "--devices", "8", "model.n_layrs=2"], "did you mean 'model.n_layers'"),
    (["bench", "configs/t5_tiny.yaml", "--steps", "1", "model.n_heads=3"], "divisible"),
])
def test_bad_input_exits_2(args, fragment, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_bench_prints_the_contract_json(tmp_path):
    result = _run("bench", "configs/tiny.yaml", f"workdir={tmp_path}", "--steps", "2", "--warmup", "0")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_sec", "step_time_s", "compile_time_s", "flops_per_token", "mfu", "peak_memory_bytes"):
        assert key in report
    assert report["tokens_per_sec"] > 0 and report["step_time_s"] > 0
    assert 0 < report["mfu"] < 1


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(300)]
    for i in range(12):
        (corpus / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(2000)))
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "llm_jax.cli", "train", "configs/tiny.yaml", f"workdir={workdir}",
            "data.source=text", f"data.path={corpus}/*.txt", f"data.prepared_dir={tmp_path / 'prepared'}",
            "model.vocab_size=300", "train.steps=100000", "train.log_every=1", "checkpoint.every=100000",
            "train.progress=false"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    def logged_steps():
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    while time.time() < deadline and proc.poll() is None and logged_steps() < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3
    assert "SIGTERM" in err


@pytest.mark.parametrize("option, fragment", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be positive"),
    (["--top-k", "-2"], "--top-k must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--num-beams", "2", "--num-return-sequences", "3"], "at most --num-beams"),
    (["--temperature", "0", "--num-return-sequences", "2"], "needs sampling"),
    (["--min-new-tokens", "9", "--max-new-tokens", "4"], "--min-new-tokens must be in"),
])
def test_generate_refuses_impossible_options_before_reading_the_run(option, fragment, capsys):
    # The run directory does not exist: the options are checked first, so their error is the one named.
    assert main(["generate", "/no/such/run", "--prompt", "x", *option]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_version_comes_from_the_package_metadata(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"llm-jax {metadata.version('llm_jax')}"


def test_train_help_says_where_the_keys_are_listed(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "llm_jax/config/schema.py" in out and "README's Configuration section" in out
    assert "model.*" in out and "optimizer.*" in out and "workdir" in out
