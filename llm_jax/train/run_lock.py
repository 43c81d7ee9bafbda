"""One training run per workdir: `WORKDIR/run.lock`, held for the whole run.

Two runs on one workdir would clean up each other's checkpoint saves in flight and mix their
lines in metrics.jsonl, so a second `llm-jax train` refuses to start before it touches anything
else in the workdir. The lock is an `fcntl.flock` on the file: the kernel releases it when the
process ends, however it ends (even SIGKILL), so a crashed run never blocks the next one. The
file also says who holds it (pid, host, start time) for the message of a refused run; a file
left by a dead run is just overwritten.

In a multi-process job only process 0 takes the lock (the processes of one job are one run); its
answer is broadcast so that every process refuses together rather than some waiting forever.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from llm_jax.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class WorkdirBusy(ConfigError):
    """Another run holds the workdir; one line (exit code 2, like any config that does not fit the workdir)."""


def _holder(path: Path) -> str:
    """'pid 123 on host h, started 2026-01-01 10:00:00 UTC' from the lock file, as far as it can be read."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "a process that did not say who it is"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["started"])) if "started" in info else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {started}"


def acquire(workdir: str | os.PathLike) -> int | None:
    """Takes the lock of `workdir` (created if missing); returns the open file descriptor that holds it.

    Raises WorkdirBusy when a live process holds it. Returns None on a file system without locks
    (some network mounts): the run goes on unguarded, with a warning.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's details stay readable
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise WorkdirBusy(f"workdir {workdir} is in use by another training run ({_holder(path)}); "
                              "wait for it to end or stop it (SIGTERM saves a checkpoint), or use another "
                              "workdir") from None
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            log.warning("%s: this file system has no file locks; nothing stops a second run on this workdir", path)
            return None
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


def release(fd: int | None) -> None:
    """Unlocks. The file stays: deleting it would race with a next run that already opened it."""
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[None]:
    """The lock of `workdir` for the body, taken by process 0 and agreed on by all processes."""
    import jax
    from jax.experimental import multihost_utils

    fd, refused = None, None
    if jax.process_index() == 0:
        try:
            fd = acquire(workdir)
        except Exception as e:  # busy, or no lock file can be written (read-only workdir): all stop
            refused = e
    if jax.process_count() > 1:  # every process learns process 0's answer: all refuse, or all run
        import numpy as np

        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(refused is not None)))
        if failed and refused is None:
            refused = WorkdirBusy(f"workdir {workdir}: process 0 could not take the run's lock (see its message)")
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        release(fd)
