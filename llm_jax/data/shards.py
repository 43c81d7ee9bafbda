"""Training batches from virtual shards: the global batch of a step is a function of the seed and the
step alone, whatever the number of processes, the mesh or `data.workers`.

The one global document stream (`pipeline.global_documents`) is dealt to V virtual shards
(`data.virtual_shards`): shard v reads documents v, v + V, v + 2V, ... and tokenizes, cuts,
window-shuffles and packs them into R = train.batch_size / V rows per step (for mlm and span, each
document is masked with an rng of the seed, v and its index in shard v's stream, so the masks are
fixed too). Row r of a step's global batch is row r % R of shard r // R. V is set by the config,
never by the run's layout.

A process runs the shards covering the global rows its devices hold (`rows`; a shard only partly
held is run whole and sliced) and yields exactly those rows, in order. With `data.workers`, worker
processes tokenize and cut the documents of all the process's shards, returned in order; the
packing stays in the process. So neither the workers nor the layout change a batch, and a shard's
checkpointed state (`data/position.py`) resumes it on any layout.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import math
import multiprocessing
import os
import signal
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from llm_jax.config import Config
from llm_jax.data import pipeline as data_lib
from llm_jax.data import position

log = logging.getLogger(__name__)

Rows = list[tuple[int, int]]  # global row ranges [start, stop), sorted and disjoint

DEFAULT_MAX_SHARDS = 8
_CHUNK = 4  # documents per task sent to a worker process
_SALT_WINDOW, _SALT_PACK, _SALT_MASK = 2, 1, 3  # seeds of the piece window, the packing and (mlm, span) masks by shard


def num_virtual_shards(config: Config) -> int:
    """data.virtual_shards, or by default the largest divisor of train.batch_size up to 8 that is a
    power of two (gcd): the same for every layout of the run."""
    return config.data.virtual_shards or math.gcd(config.train.batch_size, DEFAULT_MAX_SHARDS)


def shards_of(rows: Rows, rows_per_shard: int) -> list[int]:
    """The virtual shards that hold any of `rows`, ascending."""
    return sorted({r // rows_per_shard for start, stop in rows for r in range(start, stop)})


def _seed(config: Config, salt: int, shard: int) -> int:
    return int(np.random.SeedSequence([config.seed % 2**32, salt, shard]).generate_state(1)[0])


# ----------------------------------------------------------------------------- documents, in order


def _allow_grain_in_workers() -> None:
    """grain reads absl flags; a program that never parsed them must say so (worker processes too)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


_WORKER_SHARDS: dict[int, grain.MapDataset] = {}  # in a worker process: the process's shards' documents


def _start_worker(shards: dict[int, grain.MapDataset]) -> None:
    # Ctrl-C and SIGTERM reach the whole process group; the training process, which stops cleanly
    # and saves, ends its workers itself (a worker dying first would break the batch in flight).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _allow_grain_in_workers()
    _WORKER_SHARDS.update(shards)


def _cut_range(shard: int, start: int, count: int) -> list:
    return [_WORKER_SHARDS[shard][i] for i in range(start, start + count)]


class DocumentPool:
    """Worker processes that tokenize and cut the documents of every shard of this process.

    They receive the shards' datasets once (the tokenizer travels as bytes) and then ranges of
    document indices; each result is taken in the order asked for. A worker that dies breaks the
    pool: the next result raises instead of waiting forever.
    """

    def __init__(self, shards: dict[int, grain.MapDataset], workers: int):
        # spawn: the parent has JAX's threads running, which a fork would copy in a broken state.
        self._executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(shards,))
        self.workers = workers
        self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)

    def submit(self, shard: int, start: int, count: int) -> concurrent.futures.Future:
        return self._executor.submit(_cut_range, shard, start, count)

    def close(self) -> None:
        self._finalizer()


class _DocumentsIterator(grain.DatasetIterator):
    """The pieces of a shard's documents, in order; its state is the next document's index, the
    same with or without worker processes."""

    def __init__(self, docs: grain.MapDataset, shard: int, pool: DocumentPool | None):
        super().__init__()
        self._docs, self._shard, self._pool = docs, shard, pool
        self._next = 0  # the next document to return
        self._reset()

    def _reset(self) -> None:
        self._ready: collections.deque = collections.deque()  # computed documents from self._next on
        self._pending: collections.deque = collections.deque()  # tasks for the documents after those
        self._asked = self._next  # the first document not asked for yet

    def __next__(self):
        if self._pool is None:
            element = self._docs[self._next]
        else:
            while len(self._pending) < 2 * self._pool.workers:  # keep every worker busy
                self._pending.append(self._pool.submit(self._shard, self._asked, _CHUNK))
                self._asked += _CHUNK
            if not self._ready:
                self._ready.extend(self._pending.popleft().result())
            element = self._ready.popleft()
        self._next += 1
        return element

    def get_state(self) -> dict:
        return {"next_index": self._next}

    def set_state(self, state: dict) -> None:
        self._next = int(state["next_index"])
        self._reset()  # results still in flight belong to the old position; they are dropped


class _Documents(grain.IterDataset):
    def __init__(self, docs: grain.MapDataset, shard: int, pool: DocumentPool | None):
        super().__init__()
        self._docs, self._shard, self._pool = docs, shard, pool

    def __iter__(self) -> _DocumentsIterator:
        return _DocumentsIterator(self._docs, self._shard, self._pool)


# ----------------------------------------------------------------------------- the iterator


def shard_batches(config: Config, shard: int, documents: grain.IterDataset) -> grain.IterDataset:
    """One shard's batches [rows per shard, seq_len] (an encoder-decoder's decoder side: target_len)
    from the pieces of its documents, in order."""
    c = config
    rows = c.train.batch_size // num_virtual_shards(c)
    pieces = data_lib.flatten_pieces(documents)
    # A window per shard, of the full size: grain's window shuffle costs about the same per window
    # whatever its size (measured: 18 ms), so V windows of size/V made the loader 40% slower.
    if c.data.shuffle and c.data.shuffle_window > 1:
        pieces = grain.experimental.WindowShuffleIterDataset(pieces, window_size=c.data.shuffle_window,
                                                             seed=_seed(c, _SALT_WINDOW, shard))
    # More bins than rows: the short last pieces of documents find room, less padding.
    return data_lib.packed_batches(pieces, data_lib.piece_lengths(c), rows, num_bins=max(2 * rows, 16),
                                   seed=_seed(c, _SALT_PACK, shard), shuffle_bins=c.data.shuffle,
                                   drop_remainder=True, max_documents=c.model.resolved_max_documents_per_row)


class TrainIterator:
    """This process's endless, checkpointable iterator of training batches: the global rows `rows`
    of every step (None: all train.batch_size rows), in order, as arrays [rows held, seq_len] (an
    encoder-decoder's decoder side: [rows held, target_len]).

    `data.prefetch` steps are made ahead in a background thread. The state (`get_state`) holds the
    position of each virtual shard run here (`data/position.py`).
    """

    def __init__(self, config: Config, tokenizer: Any, sources: Any, rows: Rows | None = None):
        c = config
        self.virtual_shards = num_virtual_shards(c)
        self.rows_per_shard = c.train.batch_size // self.virtual_shards
        self.rows = [(int(a), int(b)) for a, b in (rows if rows is not None else [(0, c.train.batch_size)])]
        bounds = [0, *(x for span in self.rows for x in span), c.train.batch_size]
        if not self.rows or bounds != sorted(bounds) or any(a == b for a, b in self.rows):
            raise ValueError(f"rows {self.rows} are not sorted, disjoint ranges of a batch of {c.train.batch_size}")
        self.shards = shards_of(self.rows, self.rows_per_shard)
        # Where the held rows are in the concatenated rows of this process's shards.
        r = self.rows_per_shard
        at = [self.shards.index(row // r) * r + row % r for start, stop in self.rows for row in range(start, stop)]
        self._take = None if at == list(range(len(self.shards) * r)) else np.asarray(at)

        everything = data_lib.global_documents(c, sources)
        # mlm, span: document i of shard v is masked with the rng of (seed, salt, v, i), in the worker
        # processes too; i counts on through the epochs, so a document seen again gets new masks.
        documents = {v: data_lib.cut_documents(c, tokenizer, everything[v::self.virtual_shards],
                                               (c.seed % 2**32, _SALT_MASK, v)) for v in self.shards}
        self._pool = DocumentPool(documents, c.data.workers) if c.data.workers else None
        steps = grain.experimental.ZipIterDataset(
            [shard_batches(c, v, _Documents(documents[v], v, self._pool)) for v in self.shards]).map(self._assemble)
        if c.data.prefetch:
            # Tokenizing and packing then overlap the step instead of preceding it.
            steps = grain.experimental.ThreadPrefetchIterDataset(steps, prefetch_buffer_size=c.data.prefetch)
        self._steps = iter(steps)

    def _assemble(self, shard_batches: tuple) -> dict[str, np.ndarray]:
        """The held rows of one step, from the batches of this process's shards (ascending)."""
        out = {}
        for key in shard_batches[0]:
            rows = np.concatenate([b[key] for b in shard_batches])
            out[key] = rows if self._take is None else rows[self._take]
        return out

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._steps)

    def get_state(self) -> dict:
        return position.wrap(self.virtual_shards, dict(zip(self.shards, self._steps.get_state()["parents"])))

    def restore_from_saved(self, saved: Sequence[dict]) -> None:
        """Resumes from the saved states of all the processes of a checkpoint, of any layout.

        States from before virtual shards cannot be placed: the data restarts from the beginning of
        the stream, with a warning."""
        if not all(position.is_current(state) for state in saved):
            log.warning("the checkpoint's data position was saved by an older version, without virtual shards: "
                        "the data restarts from the beginning of the stream at the restored step")
            return
        states = position.pick_shards(saved, self.virtual_shards, self.shards)
        self._steps.set_state({"parents": [states[v] for v in self.shards]})

    def set_state(self, state: dict) -> None:
        """Resumes from one saved state; it must hold every shard this process runs."""
        self.restore_from_saved([state])

    def close(self) -> None:
        """Stops the prefetch thread and the worker processes."""
        close = getattr(self._steps, "close", None)
        if close is not None:
            close()
        if self._pool is not None:
            self._pool.close()


def make_train_iterator(config: Config, tokenizer: Any, sources: Any, rows: Rows | None = None) -> TrainIterator:
    """Endless, checkpointable iterator of the training rows `rows` (None: all) of every step."""
    return TrainIterator(config, tokenizer, sources, rows)


# ----------------------------------------------------------------------------- checkpointing


def iterator_state(it: TrainIterator) -> dict:
    """The iterator's position as a JSON-serialisable dict (grain states are nested ints)."""
    return json.loads(json.dumps(it.get_state()))  # fails loudly here, not in the checkpointer


def restore_iterator_state(it: TrainIterator, state: dict) -> None:
    """Moves `it` to one saved `state` (of a process that ran every shard `it` runs)."""
    it.set_state(state)


def restore_from_checkpoint_dir(it: TrainIterator, data_dir: str | os.PathLike) -> None:
    """Restores `it` from the data states that every process saved in a checkpoint's data folder."""
    states = position.read_saved_states(data_dir)
    if not states:
        raise FileNotFoundError(f"{data_dir} holds no saved data states")  # a missing file: damage
    it.restore_from_saved(list(states.values()))
