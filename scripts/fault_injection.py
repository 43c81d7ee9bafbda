"""Kills a training run with SIGKILL at random moments, resumes it each time, and checks that it
ends with exactly the metrics of an uninterrupted run of the same config.

    python scripts/fault_injection.py [--kills 5] [--steps 150] [--seed 0] [--root DIR]

1. An uninterrupted reference run (tiny model, CPU, a small generated corpus) in ROOT/reference.
2. The same config in ROOT/interrupted, started again after each of --kills SIGKILLs. Kills
   alternate between a random moment of the run and the moment an async checkpoint save is in
   flight (an Orbax temporary directory exists); each run resumes from the last complete checkpoint.
3. A last run in ROOT/interrupted finishes the job.
4. The metrics of both are compared: metrics.jsonl is appended across resumes, so the last line of
   each step counts. Train lines: loss, lr, grad_norm, nonfinite_steps; eval lines: eval_loss.
   They must be identical. Prints each kill, then PASS or FAIL with the differences (exit 0 / 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMPARED = ("loss", "lr", "grad_norm", "nonfinite_steps", "eval_loss", "eval_perplexity")
TMP_MARK = ".orbax-checkpoint-tmp"
WORDS = ("the cat sat on the mat and the dog ran to the park where the birds sang all day long while children "
         "played games in the warm sun before going home for dinner").split()


def write_corpus(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(60):
        (directory / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(400)) + "\n")


def train_command(root: Path, workdir: Path, steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "llm_jax.cli", "train", "configs/tiny.yaml", f"workdir={workdir}",
            "data.source=text", f"data.path={root / 'corpus'}/*.txt", f"data.prepared_dir={root / 'prepared'}",
            "model.vocab_size=300", "tokenizer.sample_bytes=100000", "train.seq_len=32", "train.batch_size=8",
            f"train.steps={steps}", "train.log_every=1", "train.eval_every=25", "checkpoint.every=5",
            "checkpoint.keep=2", "train.progress=false", "train.sample_tokens=8", *extra]


def last_rows(metrics: Path) -> dict[tuple[int, str], dict]:
    """(step, 'train' | 'eval') -> the last line written for it."""
    rows: dict[tuple[int, str], dict] = {}
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by SIGKILL is reported, not fatal
            print(f"  unreadable line in {metrics}: {line[:80]!r}")
            continue
        rows[(row["step"], "eval" if "eval_loss" in row else "train")] = row
    return rows


def logged_steps(metrics: Path) -> int:
    return max((step for step, kind in last_rows(metrics) if kind == "train"), default=0)


def newest_checkpoint(workdir: Path) -> int | None:
    checkpoints = workdir / "checkpoints"
    steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.is_dir() else []
    return max(steps, default=None)


def saving_now(workdir: Path) -> bool:
    checkpoints = workdir / "checkpoints"
    return checkpoints.is_dir() and any(TMP_MARK in p.name for p in checkpoints.iterdir())


def run_until_killed(command: list[str], workdir: Path, mode: str, rng: random.Random, window_s: float,
                     log) -> dict:
    """Starts the run and SIGKILLs it (mode 'random': a random moment once it trains; 'save': while
    a checkpoint is being written). Returns what happened."""
    before = logged_steps(workdir / "metrics.jsonl")
    resume_from = newest_checkpoint(workdir)
    proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.time()
    delay = rng.uniform(0.0, window_s)
    training_since = None
    while proc.poll() is None:
        if training_since is None and logged_steps(workdir / "metrics.jsonl") > before:
            training_since = time.time()
        if training_since is not None:
            if (mode == "random" and time.time() - training_since >= delay) or (mode == "save" and saving_now(workdir)):
                during_save = saving_now(workdir)
                os.killpg(proc.pid, signal.SIGKILL)  # the run and any loader workers it started
                proc.wait()
                return {"mode": mode, "killed": True, "during_save": during_save, "after_s": time.time() - started,
                        "steps_logged": logged_steps(workdir / "metrics.jsonl"), "resumed_from": resume_from,
                        "newest_checkpoint": newest_checkpoint(workdir)}
        time.sleep(0.002 if mode == "save" else 0.01)
    return {"mode": mode, "killed": False, "returncode": proc.returncode, "resumed_from": resume_from}


def compare(reference: Path, interrupted: Path) -> list[str]:
    ref, got = last_rows(reference / "metrics.jsonl"), last_rows(interrupted / "metrics.jsonl")
    problems = []
    if sorted(ref) != sorted(got):
        problems.append(f"different lines: only in reference {sorted(set(ref) - set(got))[:10]}, "
                        f"only in interrupted {sorted(set(got) - set(ref))[:10]}")
    for key in sorted(set(ref) & set(got)):
        for name in COMPARED:
            if name in ref[key] and ref[key][name] != got[key].get(name):
                problems.append(f"step {key[0]} {name}: reference {ref[key][name]!r}, "
                                f"interrupted {got[key].get(name)!r}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=None, help="work directory (default: a new temporary one)")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="fault_injection-"))
    root = root.absolute()
    for name in ("reference", "interrupted"):
        shutil.rmtree(root / name, ignore_errors=True)
    write_corpus(root / "corpus")
    rng = random.Random(args.seed)
    print(f"work directory {root}")

    with open(root / "reference.log", "w") as log:
        t0 = time.time()
        result = subprocess.run(train_command(root, root / "reference", args.steps, []), cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)
    reference_s = time.time() - t0
    if result.returncode != 0:
        print(f"FAIL: the reference run exited {result.returncode}; see {root / 'reference.log'}")
        return 1
    print(f"reference run: {args.steps} steps in {reference_s:.1f}s")

    # The interrupted runs use the reference's tokenizer, so that only the interruptions differ.
    command = train_command(root, root / "interrupted", args.steps,
                            [f"tokenizer.path={root / 'reference' / 'tokenizer' / 'spm.model'}"])
    kills = []
    with open(root / "interrupted.log", "w") as log:
        for i in range(args.kills):
            mode = "save" if i % 2 else "random"
            event = run_until_killed(command, root / "interrupted", mode, rng, window_s=reference_s / 3, log=log)
            kills.append(event)
            if event["killed"]:
                print(f"kill {i + 1} ({mode}): {event['after_s']:.1f}s after start (resumed from checkpoint "
                      f"{event['resumed_from']}), at step {event['steps_logged']}, "
                      f"{'during' if event['during_save'] else 'not during'} a checkpoint save; newest complete "
                      f"checkpoint {event['newest_checkpoint']}")
            else:
                print(f"kill {i + 1} ({mode}): the run ended first (exit {event['returncode']})")
                if event["returncode"] != 0:
                    print(f"FAIL: a resumed run exited {event['returncode']}; see {root / 'interrupted.log'}")
                    return 1
        final = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if final.returncode != 0:
        print(f"FAIL: the last run exited {final.returncode}; see {root / 'interrupted.log'}")
        return 1

    killed = sum(e["killed"] for e in kills)
    during_save = sum(e["killed"] and e["during_save"] for e in kills)
    problems = compare(root / "reference", root / "interrupted")
    compared = len(last_rows(root / "reference" / "metrics.jsonl"))
    if problems:
        print(f"FAIL: {len(problems)} differences after {killed} kills ({during_save} during a save):")
        for line in problems[:30]:
            print("  " + line)
        return 1
    print(f"PASS: {killed} SIGKILLs ({during_save} during a checkpoint save); the {compared} metrics lines "
          f"(last occurrence of each step) equal the uninterrupted run's exactly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
