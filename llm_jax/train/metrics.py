"""Where metrics go: `metrics.jsonl` (appended across resumes) and TensorBoard event files.

Only process 0 writes; on the others every call is a no-op, so callers need no checks.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    """Python scalars for JSON; non-finite floats stay visible as strings rather than invalid JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@contextlib.contextmanager
def _named(path: Path):
    """A write or flush of a buffered file fails (disk full) with an OSError that has no file name:
    give it the path, so that the one line the command prints says which file."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or not e.errno:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def _stop_event_threads(tb) -> None:
    """Stops the event file threads of a SummaryWriter whose close failed (disk full): left running, each
    dies with a traceback ('handle is closed') when the process ends, after the one-line error."""
    for writer in (getattr(tb, "all_writers", None) or {}).values():
        worker = getattr(getattr(writer, "event_writer", None), "_worker", None)
        if worker is not None:
            with contextlib.suppress(Exception):
                worker.stop()


class MetricsWriter:
    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        workdir = Path(workdir)
        self._path = workdir / "metrics.jsonl"
        self._jsonl = open(self._path, "a", buffering=1)
        from tensorboardX import SummaryWriter  # no TensorFlow needed

        self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with _named(self._path):
            self._jsonl.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            jsonl, tb, self._jsonl, self._tb = self._jsonl, self._tb, None, None  # closed once, even if a flush fails
            try:
                with _named(self._path):
                    jsonl.close()
            finally:
                try:
                    with _named(Path(tb.logdir)):
                        tb.close()
                except OSError:
                    _stop_event_threads(tb)  # its final flush failed before it stopped them
                    raise


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file, in order."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
