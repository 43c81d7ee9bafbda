"""Faults of the machine (disk full, read-only path, a file where a folder should be, a damaged file)
told in one line: what failed, where, and what to do.

The errors come from many layers: Python's own OSError, or tensorstore (under Orbax) reporting
`RESOURCE_EXHAUSTED ... [os_error_code='28']` in a ValueError raised from a background thread. All
are reduced here to the OSError behind them, so the command line has one place that words them.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading

from llm_jax.runtime.stop_signal import StartupInterrupted

# What the user can do about each kind of fault. The run itself is never the problem: its saved
# checkpoints stay, and the same command resumes once the cause is fixed.
_HINTS = {
    errno.ENOSPC: "free some space (or move workdir to a larger disk) and run the same command again",
    errno.EDQUOT: "the disk quota is used up: free some space and run the same command again",
    errno.EROFS: "the file system is read-only: make it writable or use another workdir",
    errno.EACCES: "no permission: fix the permissions or use another path",
    errno.EPERM: "not permitted: fix the permissions or use another path",
    errno.ENOTDIR: "a file stands where a folder is needed: move it away or use another path",
    errno.EEXIST: "something is already there: move it away or use another path",
    errno.EISDIR: "a folder stands where a file is needed: move it away or use another path",
    errno.EIO: "the disk reports an input/output error: check it",
}
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # tensorstore's wording of an errno
_TENSORSTORE_PATH = re.compile(r'(?:Failed writing|local file|Error opening file|Failed to open): "([^"]+)"')


class MachineFault(RuntimeError):
    """A fault of the machine, already worded as one line (exit code 2)."""


def os_error_in(exc: BaseException | None) -> OSError | None:
    """The OSError behind `exc`: itself, one among its causes, or an errno that tensorstore
    wrote into its message (with the path it names). None when the failure is not the machine's."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc
        code = _OS_ERROR_CODE.search(str(exc))
        if code is not None:
            number = int(code.group(1))
            paths = _TENSORSTORE_PATH.findall(str(exc))
            return OSError(number, os.strerror(number), paths[-1] if paths else None)
        # Only explicit causes (`raise ... from`): an error raised while another was being handled
        # (`__context__`) may be a bug of its own, which must not pass for a full disk.
        exc = exc.__cause__
    return None


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): a library's multi-line
    error told in the one line a user sees."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def describe(error: OSError) -> str:
    """'No space left on device: /path; free some space ...' (one line)."""
    what = error.strerror or str(error)
    where = f": {error.filename}" if error.filename else ""
    hint = _HINTS.get(error.errno)
    return f"{what}{where}" + (f"; {hint}" if hint else "")


class QuietMachineFaults(logging.Filter):
    """Drops the error reports (with tracebacks) that libraries log from their own threads about a
    machine fault: the same fault reaches the main thread as an exception and is told there, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return os_error_in(exc) is None and _OS_ERROR_CODE.search(record.getMessage()) is None


def _is_late_callback(exc: BaseException | None) -> bool:
    """tensorstore completing a write for an asyncio loop that an aborted save already closed."""
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def quiet_aborted_saves() -> None:
    """Keeps the echoes of a failed write off stderr, where they would bury the one line.

    When a save fails (disk full), Orbax closes its event loop while tensorstore still completes
    the other writes of that save; each completion then reports 'Event loop is closed' through
    sys.excepthook, and coroutines never awaited through sys.unraisablehook: dozens of tracebacks
    before the one line that says what happened. A background thread (an event file writer) that
    dies of the same fault is told in one log line instead of a traceback. Everything else passes
    through unchanged.
    """
    if getattr(sys.excepthook, "quiets_aborted_saves", False):
        return  # installed already (main called again in one process, as tests do)
    excepthook, unraisablehook, thread_excepthook = sys.excepthook, sys.unraisablehook, threading.excepthook

    def quiet_excepthook(kind, value, traceback):
        if not _is_late_callback(value):
            excepthook(kind, value, traceback)

    def quiet_unraisablehook(unraisable):
        if isinstance(unraisable.exc_value, StartupInterrupted):
            return  # a signal that landed in a callback: its request is honoured when the start-up ends
        if not (_is_late_callback(unraisable.exc_value) or os_error_in(unraisable.exc_value) is not None):
            unraisablehook(unraisable)

    def quiet_thread_excepthook(args):
        error = os_error_in(args.exc_value)
        if _is_late_callback(args.exc_value):
            return
        if error is None:
            thread_excepthook(args)
        else:
            name = args.thread.name if args.thread is not None else "a background thread"
            logging.getLogger(__name__).warning("%s stopped: %s", name, describe(error))

    quiet_excepthook.quiets_aborted_saves = True
    sys.excepthook, sys.unraisablehook, threading.excepthook = (quiet_excepthook, quiet_unraisablehook,
                                                                quiet_thread_excepthook)
