"""SIGTERM/SIGINT: preemption is normal, not an error.

In the training loop a signal asks the run to finish its current step, save a checkpoint and exit
0. Before the first step (start-up: reading data, training the tokenizer, restoring, compiling)
there is nothing to save yet, so a signal ends the run at once and says that nothing was lost. A
second SIGINT always interrupts, for a run that is stuck.

No JAX here: the command line installs this before it imports JAX.
"""

from __future__ import annotations

import contextlib
import logging
import signal

log = logging.getLogger(__name__)


_STARTUP_MESSAGE = ("stopped by {name} during start-up, before the first step: nothing to save, nothing lost; "
                    "run the same command to start again")


class StartupInterrupted(BaseException):
    """A signal arrived before the first step. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on its way (a checkpoint restore, a data preparation) takes it for a failure
    of its own and, say, sets a good checkpoint aside."""


class StopSignal:
    """Handles SIGTERM/SIGINT while entered: at once during start-up, after the step once `running()`."""

    def __init__(self):
        self.requested = False
        self.signal_name = "a signal"  # the first one received
        self.starting = True
        self._deferred = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        outer = getattr(self._previous[signal.SIGINT], "__self__", None)
        if isinstance(outer, StopSignal):  # nested (the command line's, then the trainer's): one request
            self.requested, self.signal_name = outer.requested, outer.signal_name
        return self

    def running(self) -> None:
        """The training loop starts: from now on a signal stops the run after the current step.

        A signal's exception can be swallowed where it lands (a garbage-collector callback, say,
        only prints it); the request it set is honoured here, at the end of the start-up.
        """
        if self.starting and self.requested:
            raise StartupInterrupted(_STARTUP_MESSAGE.format(name=self.signal_name))
        self.starting = False

    @contextlib.contextmanager
    def deferred(self):
        """A start-up signal in the body is only recorded, and honoured when the body ends: imported C
        extensions (numpy's, JAX's) turn an exception raised in their initialisation into an ImportError."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False
        if self.starting and self.requested:
            raise StartupInterrupted(_STARTUP_MESSAGE.format(name=self.signal_name))

    def _handle(self, signum, _frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested:
            return  # a second SIGTERM: the first one's stop is under way
        self.requested, self.signal_name = True, name
        if self.starting and not self._deferred:
            raise StartupInterrupted(_STARTUP_MESSAGE.format(name=name))
        log.warning("received %s: stopping after this step and saving a checkpoint", name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
