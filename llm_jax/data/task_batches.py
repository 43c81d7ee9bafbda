"""Batches of labelled examples (task.kind classify | tag) for the one trainer (train/loop.py).

A row holds one example, never packed with others (a classification reads one position of it, and a
sentence's tags are its own), padded to train.seq_len. The arrays of a batch, [B, L] unless said:
    inputs       token ids (data/task_inputs.py: [CLS] ... [SEP] for encoders, [bos] ... for decoders)
    positions    0, 1, ... along the row (0 on padding)
    segment_ids  1 on the example's tokens, 0 on padding (attention never crosses them; pooling reads 1s)
    token_types  0 for the first text, 1 for a classification pair's second one (encoders read them)
    labels       classify: [B, 1], the label id; tag: the word's tag id on its first piece, -1 elsewhere.
                 A padding row has label -1: the loss and the metrics skip every -1.
Kept on the host only (not a device array): `word_index` [B, L] of a tag batch, each piece's word
(-1 for specials and padding), which turns per-piece predictions back into per-word tags (predict).

Training order (`TaskIterator`): the training examples in one endless stream, shuffled by the seed
(grain's `MapDataset.shuffle`, a new order every epoch) and repeated; the global batch of step s is
stream[s * B : (s + 1) * B], a function of the seed and the step alone. A process encodes only the
global rows its devices hold (`mesh.batch_rows`), as pretraining's shards do, so its state is the
step alone: the same in every process's file, restored exactly on any layout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from llm_jax.config import Config, ConfigError
from llm_jax.data.labelled import ClassifyExample, LabelSet, TagExample
from llm_jax.data.task_inputs import IGNORE, ClassifyEncoder, TagEncoder

log = logging.getLogger(__name__)

STATE_FORMAT = "task-1"  # the saved position of a TaskIterator (position.py's format is for pretraining)
HOST_ONLY_KEYS = ("word_index",)

Rows = list[tuple[int, int]]


def make_encoder(config: Config, tokenizer: Any, labels: LabelSet) -> ClassifyEncoder | TagEncoder:
    encoder = config.model.family.encoder
    cls = ClassifyEncoder if config.task.kind == "classify" else TagEncoder
    return cls(tokenizer, labels, config.train.seq_len, encoder)


def pad_row(features: dict[str, np.ndarray] | None, kind: str, seq_len: int) -> dict[str, np.ndarray]:
    """One encoded example (None: a padding row) as a row of seq_len (see the module docstring)."""
    n = 0 if features is None else len(features["inputs"])
    row = {"inputs": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32),
           "segment_ids": np.zeros(seq_len, np.int32), "token_types": np.zeros(seq_len, np.int32)}
    if kind == "classify":
        row["labels"] = np.full(1, IGNORE, np.int32)
    else:
        row["labels"] = np.full(seq_len, IGNORE, np.int32)
        row["word_index"] = np.full(seq_len, IGNORE, np.int32)
    if features is None:
        return row
    row["inputs"][:n] = features["inputs"]
    row["positions"][:n] = np.arange(n, dtype=np.int32)
    row["segment_ids"][:n] = 1
    if kind == "classify":
        row["token_types"][:n] = features["token_types"]
        row["labels"][0] = features["label"]
    else:
        row["labels"][:n] = features["labels"]
        row["word_index"][:n] = features["word_index"]
    return row


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def device_part(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays the steps read (without the host-only word_index)."""
    return {k: v for k, v in batch.items() if k not in HOST_ONLY_KEYS}


def fixed_batches(examples: Sequence[ClassifyExample | TagExample], encode, kind: str, batch_size: int,
                  seq_len: int, rows: Rows | None = None) -> list[dict[str, np.ndarray]]:
    """Every example once, in order, in batches of batch_size rows (the last padded with label -1 rows);
    each batch cut to the global rows `rows` (None: all), so every process has as many batches."""
    spans = rows if rows is not None else [(0, batch_size)]
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        encoded = [pad_row(encode(e), kind, seq_len) for e in chunk]
        encoded += [pad_row(None, kind, seq_len)] * (batch_size - len(chunk))
        batch = stack_rows(encoded)
        out.append({k: np.concatenate([v[a:b] for a, b in spans]) for k, v in batch.items()})
    return out


class TaskIterator:
    """Endless, checkpointable training batches of labelled examples: the rows `rows` of each step's
    global batch (see the module docstring). Duck-types data/shards.TrainIterator for the loop and
    the checkpointer: next, get_state, restore_from_saved, close."""

    def __init__(self, config: Config, tokenizer: Any, sources: Any, rows: Rows | None = None):
        c = config
        self.kind, self.seq_len, self.batch_size = c.task.kind, c.train.seq_len, c.train.batch_size
        self.examples = len(sources.train)
        stream = grain.MapDataset.source(sources.train)
        if c.data.shuffle:
            stream = stream.shuffle(seed=c.seed % 2**32)
        self._stream = stream.repeat()
        self._encode = make_encoder(c, tokenizer, sources.labels)
        self._rows = [r for start, stop in (rows or [(0, self.batch_size)]) for r in range(start, stop)]
        self.step = 0  # the next step's batch

    def __iter__(self) -> TaskIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        base = self.step * self.batch_size
        batch = stack_rows([pad_row(self._encode(self._stream[base + r]), self.kind, self.seq_len)
                            for r in self._rows])
        self.step += 1
        return device_part(batch)

    def get_state(self) -> dict:
        return {"format": STATE_FORMAT, "step": self.step, "examples": self.examples,
                "batch_size": self.batch_size}

    def restore_from_saved(self, saved: Sequence[dict]) -> None:
        """Every process saved the same position; a checkpoint of another data size is refused."""
        states = list(saved)
        if not states or any(s.get("format") != STATE_FORMAT for s in states):
            raise ConfigError("the checkpoint's data position is not of a classify or tag run "
                              "(task.kind differs from the run that saved it)")
        steps = {int(s["step"]) for s in states}
        if len(steps) != 1:
            raise FileNotFoundError(f"the checkpoint's data states disagree on the step ({sorted(steps)}): damaged")
        state = states[0]
        if state["examples"] != self.examples or state["batch_size"] != self.batch_size:
            log.warning("the training examples or train.batch_size changed since the checkpoint (%d examples, "
                        "batch %d; now %d, %d): the data continues at its step, not exactly where it was",
                        state["examples"], state["batch_size"], self.examples, self.batch_size)
        self.step = steps.pop()

    def set_state(self, state: dict) -> None:
        self.restore_from_saved([state])

    def close(self) -> None:
        pass  # no threads or processes: examples are encoded as the step asks for them
