"""A damaged newest checkpoint is reported, set aside (never deleted) and an older one is used."""

from pathlib import Path

from test_trainer import _config, corpus  # noqa: F401 - the corpus fixture

from llm_jax.metrics import read_metrics
from llm_jax.trainer import train


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
