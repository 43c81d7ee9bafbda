"""The input pipeline: document sources -> grain (shuffle, tokenize, chunk, pack, batch) -> numpy.

Sources are random-access sequences of documents (TFDS ArrayRecord data sources), because grain
then shuffles globally by index and an iterator's position is a few integers: checkpointing the
pipeline costs nothing and restoring it yields exactly the batch that would have come next.

Targets never cross documents. A document is [bos] + ids + [eos]; it is cut into pieces of at most
seq_len + 1 tokens that overlap by one token (so every next-token target is kept once), and each
piece gives inputs = piece[:-1], targets = piece[1:]. Pieces are packed into rows of seq_len with
segment ids (1, 2, ... per piece, 0 on padding) and positions (0-based within the piece), which the
model uses to mask attention across pieces.

Batch layout (every array [per_process_batch, seq_len]): inputs, targets, segment_ids, positions
(int32) and weights (float32: 1 on real targets, 0 on padding).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from llm_jax import corpus as corpus_lib
from llm_jax import tfds_builder
from llm_jax.config import Config, ConfigError
from llm_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


# ----------------------------------------------------------------------------- sources


class TextSource:
    """A TFDS data source (records are dicts) seen as a sequence of `str` documents.

    Real TFDS text features come back as bytes, mocked ones as str; both become str here.
    """

    def __init__(self, source: Any, text_key: str):
        self._source = source
        self._text_key = text_key

    def __len__(self) -> int:
        return len(self._source)

    def _text(self, record: Any) -> str:
        value = record[self._text_key]
        if isinstance(value, np.ndarray):
            value = value.item()
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

    def __getitem__(self, index: int) -> str:
        return self._text(self._source[int(index)])

    def __repr__(self) -> str:
        return f"TextSource({len(self)} documents, key={self._text_key!r})"


@dataclasses.dataclass(frozen=True)
class DataSources:
    """Random-access sources of documents (str) for each split."""

    train: Any  # __len__ and __getitem__ -> str
    eval: Any
    description: str


def _open_tfds(config: Config) -> DataSources:
    d = config.data
    data_dir = d.tfds_data_dir or None

    def open_split(split: str, key: str) -> Any:
        try:
            return tfds.data_source(d.tfds_name, split=split, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ConfigError(f"data.tfds_name: no TFDS dataset named '{d.tfds_name}'") from None
        except ValueError as e:
            if "split" in str(e).lower():
                raise ConfigError(f"{key}: dataset '{d.tfds_name}' has no split '{split}'") from None
            raise

    train = open_split(d.tfds_train_split, "data.tfds_train_split")
    eval_ = open_split(d.tfds_eval_split, "data.tfds_eval_split")
    features = getattr(getattr(train, "dataset_info", None), "features", None)
    if features is not None and d.text_key not in features:
        raise ConfigError(f"data.text_key: dataset '{d.tfds_name}' has no feature '{d.text_key}' "
                          f"(it has: {', '.join(sorted(features.keys()))})")
    description = (f"tfds {d.tfds_name}: {len(train)} train ({d.tfds_train_split}), "
                   f"{len(eval_)} eval ({d.tfds_eval_split}) records")
    return DataSources(TextSource(train, d.text_key), TextSource(eval_, d.text_key), description)


def open_sources(config: Config) -> DataSources:
    """Opens the configured documents; local corpora are prepared once as TFDS ArrayRecord.

    Raises ConfigError for a glob that matches nothing, a corpus without documents, or an unknown
    TFDS dataset, split or feature.
    """
    if config.data.source == "tfds":
        sources = _open_tfds(config)
    else:
        corpus = corpus_lib.find_corpus(config.data)
        prepared = tfds_builder.prepare_corpus(corpus, config.data.prepared_dir or None)
        stats = corpus_lib.CorpusStats(documents=prepared.documents, skipped=prepared.skipped)
        train = prepared.data_source(tfds_builder.TRAIN)
        eval_ = prepared.data_source(tfds_builder.VALIDATION)
        sources = DataSources(TextSource(train, "text"), TextSource(eval_, "text"), corpus.describe(stats))
    if len(sources.train) == 0:
        raise ConfigError(f"the training split is empty: {sources.description}")
    if len(sources.eval) == 0:
        log.warning("the eval split is empty (%s); evaluation is skipped", sources.description)
    log.info("data: %s", sources.description)
    return sources


# ----------------------------------------------------------------------------- pieces and packing


def document_pieces(ids: list[int], seq_len: int, bos_id: int, eos_id: int) -> list[dict[str, np.ndarray]]:
    """Cuts [bos] + ids + [eos] into (inputs, targets) pieces of at most seq_len tokens.

    Consecutive pieces overlap by one token: a piece of seq_len + 1 tokens gives seq_len
    input/target pairs and the next piece starts at its last token, so no target is lost.
    """
    tokens = np.asarray([bos_id, *ids, eos_id], dtype=np.int32)
    pieces = []
    for start in range(0, len(tokens) - 1, seq_len):
        piece = tokens[start:start + seq_len + 1]
        pieces.append({"inputs": piece[:-1], "targets": piece[1:]})
    return pieces


class _Pieces(grain.experimental.FlatMapTransform):
    """Flattens the per-document lists of pieces (made in the parallel map) into single pieces."""

    max_fan_out = 1 << 30  # only used by MapDataset flat maps; ours is on an IterDataset

    def flat_map(self, element: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return element


def _to_batch(packed: dict[str, np.ndarray]) -> Batch:
    """grain's packed feature names -> the trainer's batch layout."""
    segment_ids = packed["inputs_segment_ids"].astype(np.int32)
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": segment_ids,
        "positions": packed["inputs_positions"].astype(np.int32),
        "weights": (segment_ids > 0).astype(np.float32),
    }


def _pack(pieces: grain.IterDataset, seq_len: int, num_bins: int, seed: int, shuffle_bins: bool) -> grain.IterDataset:
    return grain.experimental.FirstFitPackIterDataset(
        pieces,
        length_struct={"inputs": seq_len, "targets": seq_len},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
    )


def _tokenized_pieces(docs: grain.MapDataset, tokenizer: Tokenizer, seq_len: int,
                      num_threads: int) -> grain.IterDataset:
    """Tokenize and cut in grain's reader threads (order preserved), then flatten to pieces."""

    def cut(text: str) -> list[dict[str, np.ndarray]]:
        return document_pieces(tokenizer.encode(text), seq_len, tokenizer.bos_id, tokenizer.eos_id)

    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(16, 8 * num_threads))
    return grain.experimental.FlatMapIterDataset(docs.map(cut).to_iter_dataset(read), _Pieces())


def _reader_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _check_process(config: Config, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
    if config.train.batch_size % process_count:
        raise ConfigError(f"train.batch_size ({config.train.batch_size}) must be divisible by the "
                          f"{process_count} processes")
    return config.train.batch_size // process_count


# ----------------------------------------------------------------------------- public pipeline


def train_documents(config: Config, sources: DataSources, process_index: int = 0,
                    process_count: int = 1) -> grain.MapDataset:
    """This process's endless stream of training documents (str), before tokenization.

    One global order for all processes (same seed), reshuffled every epoch (grain's shuffle uses
    seed + epoch for indices past the first epoch); process p takes positions p, p + P, p + 2P...
    """
    if len(sources.train) == 0:
        raise ConfigError("the training split is empty")
    docs = grain.MapDataset.source(sources.train)
    if config.data.shuffle:
        docs = docs.shuffle(seed=config.seed % 2**32)
    docs = docs.repeat()
    return docs[process_index::process_count]


def make_train_iterator(config: Config, tokenizer: Tokenizer, sources: DataSources,
                        process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
    """Endless, checkpointable iterator of this process's training batches.

    Processes read disjoint documents (`train_documents`) without talking to each other; each
    packs and batches its own into [train.batch_size // process_count, seq_len].
    """
    per_process = _check_process(config, process_index, process_count)
    seq_len = config.train.seq_len
    docs = train_documents(config, sources, process_index, process_count)
    pieces = _tokenized_pieces(docs, tokenizer, seq_len, _reader_threads())
    if config.data.shuffle and config.data.shuffle_window > 1:
        pieces = grain.experimental.WindowShuffleIterDataset(
            pieces, window_size=config.data.shuffle_window, seed=(config.seed + 2) % 2**32)
    # More bins than rows per batch: short last pieces of documents find room, less padding.
    packed = _pack(pieces, seq_len, num_bins=2 * per_process, seed=(config.seed + 1) % 2**32,
                   shuffle_bins=config.data.shuffle)
    batches = packed.batch(per_process, drop_remainder=True).map(_to_batch)
    # No extra prefetch thread: reading and tokenizing already run in grain's reader threads, the
    # packing left on the caller's thread takes ~3 ms per 16x128 batch, and the trainer's one-step
    # lag hides it behind the device.
    return iter(batches)


def _pad_rows(batch: Batch, rows: int) -> Batch:
    """Adds all-zero rows (weight 0) so a short last eval batch keeps the static batch shape."""
    missing = rows - batch["inputs"].shape[0]
    if missing <= 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def make_eval_batches(config: Config, tokenizer: Tokenizer, sources: DataSources,
                      process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """At most train.eval_batches batches of the eval split, the same on every run.

    No shuffle. Every process builds the same global batches of train.batch_size rows and keeps
    its own block of rows, so all processes get the same number of batches (a collective eval
    step would hang otherwise). An empty eval split gives an empty list.
    """
    per_process = _check_process(config, process_index, process_count)
    if len(sources.eval) == 0:
        return []
    global_batch, seq_len = config.train.batch_size, config.train.seq_len
    docs = grain.MapDataset.source(sources.eval)
    pieces = _tokenized_pieces(docs, tokenizer, seq_len, _reader_threads())
    packed = _pack(pieces, seq_len, num_bins=global_batch, seed=0, shuffle_bins=False)
    batches = packed.batch(global_batch, drop_remainder=False).map(_to_batch)
    rows = slice(process_index * per_process, (process_index + 1) * per_process)
    out = []
    for batch in itertools.islice(iter(batches), config.train.eval_batches):
        batch = _pad_rows(batch, global_batch)
        out.append({k: np.ascontiguousarray(v[rows]) for k, v in batch.items()})
    return out


# ----------------------------------------------------------------------------- checkpointing


def iterator_state(it: Any) -> dict:
    """The iterator's position as a JSON-serialisable dict (grain states are nested ints)."""
    state = it.get_state()
    return json.loads(json.dumps(state))  # fails loudly here, not in the checkpointer


def restore_iterator_state(it: Any, state: dict) -> None:
    """Moves `it` (from make_train_iterator with the same config and sources) to `state`."""
    it.set_state(state)
