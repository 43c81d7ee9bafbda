"""Keeping a run alive: time-based saves, one stop/save decision for all processes, and the count
of steps skipped as non-finite.

The trainer asks these small objects once per step (the agreement acts every train.agree_every
steps). None of them touches the train state: the non-finite update itself is skipped inside the
jitted step (`steps.train_step`), and this module only counts what the step reports, one step
behind the device like every other metric.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the run stopped without saving them. One line."""


class SaveClock:
    """Time-based saves: due once `every_minutes` have passed since the last save (0: never)."""

    def __init__(self, every_minutes: float, now: Callable[[], float] = time.monotonic):
        self.interval_s = every_minutes * 60.0
        self._now = now
        self._last = now()

    def due(self) -> bool:
        """True once per interval: the save it asks for may follow a step later (after the
        processes agree), and must not be asked for again meanwhile."""
        if self.interval_s <= 0 or self._now() - self._last < self.interval_s:
            return False
        self._last = self._now()
        return True

    def saved(self) -> None:
        """Any save (by step count, signal or clock) restarts the interval."""
        self._last = self._now()


@dataclasses.dataclass(frozen=True)
class Decision:
    stop: bool  # some process was asked to stop (SIGTERM/SIGINT): all save and stop
    save: bool  # process 0's clock says a time-based save is due: all save


class ProcessAgreement:
    """Makes every process take the same stop/save decision at the same step.

    A signal reaches one process, and each host's clock reads differently, so no process may act
    on what it alone knows: the processes would then save different steps (or one would wait
    forever in a save the others never start). Every `every` steps (train.agree_every), each
    process contributes its flags (stop requested here; on process 0, a time-based save due) to a
    tiny jitted max over all devices. That answer is read at the next agreement step, `every` steps
    later, when the device has long finished it: reading never stalls the host, which stays free to
    dispatch ahead of the device, and the cross-host collective runs once per `every` steps. All
    processes agree at the same steps and read the same answers, so they act at the same step; a
    signal takes effect within 2 x `every` steps. A single process needs no exchange and acts on its
    own flags at once.
    """

    def __init__(self, mesh: Mesh, every: int = 1, multi: bool | None = None):
        self._multi = jax.process_count() > 1 if multi is None else multi  # `multi`: for tests
        self.every = every
        self._in_flight: jax.Array | None = None
        if self._multi:
            self._sharding = NamedSharding(mesh, P(mesh.axis_names))  # one row of flags per device
            self._shape = (mesh.size, 2)
            self._combine = jax.jit(lambda flags: jnp.max(flags, axis=0), out_shardings=NamedSharding(mesh, P()))

    def exchange(self, step: int, stop: bool, save_due: Callable[[], bool]) -> Decision:
        """The decision to act on at `step`. `save_due` is asked only at agreement steps, so a
        time-based save it reports is never dropped between them."""
        if not self._multi:
            return Decision(stop=stop, save=save_due())
        if step % self.every:
            return Decision(stop=False, save=False)
        row = np.array([[stop, save_due()]], np.int32)
        rows = [jax.device_put(row, d) for d in self._sharding.addressable_devices_indices_map(self._shape)]
        flags = jax.make_array_from_single_device_arrays(self._shape, self._sharding, rows)
        previous, self._in_flight = self._in_flight, self._combine(flags)
        if previous is None:
            return Decision(stop=False, save=False)
        stop_any, save_any = (bool(v) for v in np.asarray(jax.device_get(previous)))
        return Decision(stop=stop_any, save=save_any)


class NonFiniteGuard:
    """Counts the steps whose update the jitted step skipped, and notices `limit` in a row.

    Each step's flag (its `nonfinite` metric, a device scalar) is read once the next step has been
    dispatched, so the host never waits for the step it just queued. `total` is part of the
    checkpoint metadata, so a resumed run reports the same counts as an uninterrupted one.
    """

    def __init__(self, limit: int, total: int = 0):
        self.limit = limit  # 0: never stop
        self.total = total
        self.streak = 0
        self._unread: list[tuple[int, jax.Array]] = []

    def push(self, step: int, nonfinite: jax.Array) -> None:
        """Records the flag of `step` (just dispatched) and reads those of the steps before it."""
        self.read_through(step - 1)
        self._unread.append((step, nonfinite))

    def read_through(self, step: int) -> None:
        """Reads the flags of every step up to `step` (blocks until those steps are done)."""
        while self._unread and self._unread[0][0] <= step:
            _, flag = self._unread.pop(0)
            if float(jax.device_get(flag)) > 0:
                self.total += 1
                self.streak += 1
            else:
                self.streak = 0

    @property
    def diverged(self) -> bool:
        return self.limit > 0 and self.streak >= self.limit

    def message(self, step: int, last_checkpoint: int | None) -> str:
        kept = f"the last good checkpoint (step {last_checkpoint}) is kept" if last_checkpoint is not None \
            else "no checkpoint was saved"
        return (f"{self.streak} steps in a row (up to step {step}) had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={self.limit}); stopped without saving them, {kept}; "
                "lower optimizer.lr or check the data")
