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

import collections
import dataclasses
import itertools
import json
import logging
import os
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from llm_jax import corpus as corpus_lib
from llm_jax import data_position as position
from llm_jax import tfds_builder
from llm_jax.config import Config, ConfigError, DataConfig, MixtureSource
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
    """Random-access sources of documents (str) for each split.

    A mixture keeps its sources in `parts` (with their `weights`): training draws from each part's
    own endless stream. Its `train` and `eval` are weighted mixes of the parts' splits, for the
    tokenizer sample and the held-out batches.
    """

    train: Any  # __len__ and __getitem__ -> str
    eval: Any
    description: str
    documents: int | None = None  # usable documents found in local files; None: TFDS records, not checked
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> documents skipped
    parts: tuple[DataSources, ...] = ()
    weights: tuple[float, ...] = ()


def _tfds_error(d: DataConfig, split: str, key: str, error: Exception) -> ConfigError:
    """One line for a TFDS dataset that cannot be opened: unknown, not prepared, no such split."""
    where = d.tfds_data_dir or "the default TFDS data dir"
    if isinstance(error, tfds.core.registered.DatasetNotFoundError):
        return ConfigError(f"data.tfds_name: no TFDS dataset named '{d.tfds_name}'")
    try:
        prepared = tfds.builder(d.tfds_name, data_dir=d.tfds_data_dir or None).is_prepared()
    except Exception:  # the builder's own error is no clearer than ours
        prepared = False
    if not prepared:
        return ConfigError(f"data.tfds_data_dir: dataset '{d.tfds_name}' is not prepared in {where}; prepare it "
                           f"there (e.g. `tfds build {d.tfds_name} --file_format=array_record`)")
    if isinstance(error, ValueError) and "split" in str(error).lower():
        return ConfigError(f"{key}: dataset '{d.tfds_name}' has no split '{split}'")
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ConfigError(f"data.tfds_name: dataset '{d.tfds_name}' in {where} cannot be read: {first_line}")


def _open_tfds(d: DataConfig) -> DataSources:
    def open_split(split: str, key: str) -> Any:
        try:
            # download=False: a dataset that is not there is an error, never a surprise download.
            return tfds.data_source(d.tfds_name, split=split, data_dir=d.tfds_data_dir or None, download=False)
        except (tfds.core.registered.DatasetNotFoundError, ValueError, KeyError, AssertionError,
                NotImplementedError, FileNotFoundError) as e:
            raise _tfds_error(d, split, key, e) from None

    train = open_split(d.tfds_train_split, "data.tfds_train_split")
    eval_ = open_split(d.tfds_eval_split, "data.tfds_eval_split")
    features = getattr(getattr(train, "dataset_info", None), "features", None)
    if features is not None and d.text_key not in features:
        raise ConfigError(f"data.text_key: dataset '{d.tfds_name}' has no feature '{d.text_key}' "
                          f"(it has: {', '.join(sorted(features.keys()))})")
    description = (f"tfds {d.tfds_name}: {len(train)} train ({d.tfds_train_split}), "
                   f"{len(eval_)} eval ({d.tfds_eval_split}) records")
    return DataSources(TextSource(train, d.text_key), TextSource(eval_, d.text_key), description)


def _open_local(d: DataConfig, progress: bool) -> DataSources:
    corpus = corpus_lib.find_corpus(d)
    prepared = tfds_builder.prepare_corpus(corpus, d.prepared_dir or None, num_shards=d.num_shards,
                                           progress=progress)
    stats = corpus_lib.CorpusStats(documents=prepared.documents, skipped=prepared.skipped)
    train = prepared.data_source(tfds_builder.TRAIN)
    eval_ = prepared.data_source(tfds_builder.VALIDATION)
    return DataSources(TextSource(train, "text"), TextSource(eval_, "text"), corpus.describe(stats),
                       documents=prepared.documents, skipped=prepared.skipped_reasons)


def _open_one(d: DataConfig, progress: bool) -> DataSources:
    return _open_tfds(d) if d.source == "tfds" else _open_local(d, progress)


def mixture_part_config(d: DataConfig, entry: MixtureSource) -> DataConfig:
    """The data settings of one mixture source: its own source fields, the shared data.* for the rest."""
    return dataclasses.replace(d, source=entry.source, path=entry.path, text_key=entry.text_key,
                               tfds_name=entry.tfds_name, tfds_data_dir=entry.tfds_data_dir,
                               tfds_train_split=entry.tfds_train_split, tfds_eval_split=entry.tfds_eval_split,
                               mixture=())


def _weighted_mix(splits: list[Any], weights: list[float], length: int) -> Any:
    """`length` documents drawn from the endless repeats of `splits` with grain's deterministic mixing."""
    streams = [grain.MapDataset.source(split).repeat() for split in splits]
    return grain.MapDataset.mix(streams, weights)[:length]


def mix_sources(parts: list[DataSources], weights: list[float]) -> DataSources:
    """The mixture of `parts`: training draws documents from each in proportion to its weight."""
    train = _weighted_mix([p.train for p in parts], weights, sum(len(p.train) for p in parts))
    # Held out: the parts' eval splits drawn with the same weights, as long as they are together.
    with_eval = [(p.eval, w) for p, w in zip(parts, weights) if len(p.eval) > 0]
    eval_: Any = []
    if with_eval:
        eval_ = _weighted_mix([e for e, _ in with_eval], [w for _, w in with_eval], sum(len(e) for e, _ in with_eval))
    total = sum(weights)
    description = f"mixture of {len(parts)} sources: " + "; ".join(
        f"{w / total:.0%} {p.description}" for p, w in zip(parts, weights))
    local = [p for p in parts if p.documents is not None]
    skipped: collections.Counter = collections.Counter()
    for p in local:
        skipped.update(p.skipped)
    return DataSources(train, eval_, description, documents=sum(p.documents for p in local) if local else None,
                       skipped=dict(skipped), parts=tuple(parts), weights=tuple(weights))


def _open_mixture(d: DataConfig, progress: bool) -> DataSources:
    parts = []
    for i, entry in enumerate(d.mixture):
        try:
            parts.append(_open_one(mixture_part_config(d, entry), progress))
        except ConfigError as e:
            raise ConfigError(f"data.mixture.{i}: {e}") from None
        if len(parts[-1].train) == 0:
            raise ConfigError(f"data.mixture.{i}: the training split is empty: {parts[-1].description}")
    return mix_sources(parts, [entry.weight for entry in d.mixture])


def open_sources(config: Config) -> DataSources:
    """Opens the configured documents; local corpora are prepared once as TFDS ArrayRecord.

    Raises ConfigError for a glob that matches nothing, a corpus without documents, or an unknown
    TFDS dataset, split or feature.
    """
    d, progress = config.data, config.train.progress
    sources = _open_mixture(d, progress) if d.source == "mixture" else _open_one(d, progress)
    if len(sources.train) == 0:
        raise ConfigError(f"the training split is empty: {sources.description}")
    if len(sources.eval) == 0:
        log.warning("the eval split is empty (%s); evaluation is skipped", sources.description)
    log.info("data: %s", sources.description)
    return sources


def skip_summary(sources: DataSources) -> str:
    """What preparing the local documents kept and skipped, for the run log."""
    if sources.documents is None:
        return "TFDS records are read as they are (not checked, none skipped)"
    return f"{sources.documents} documents kept, {tfds_builder.describe_skips(sources.skipped)}"


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


def _shuffled_forever(split: Any, shuffle: bool, seed: int) -> grain.MapDataset:
    docs = split if isinstance(split, grain.MapDataset) else grain.MapDataset.source(split)
    if shuffle:
        docs = docs.shuffle(seed=seed % 2**32)
    return docs.repeat()


def global_documents(config: Config, sources: DataSources) -> grain.MapDataset:
    """The one endless stream of training documents that all processes share, in order.

    Reshuffled every epoch (grain's shuffle uses seed + epoch for indices past the first epoch). A
    mixture shuffles and repeats each source on its own, then mixes them with grain's deterministic
    weighted selection: any stretch of the stream holds the sources in proportion to their weights.
    """
    if len(sources.train) == 0:
        raise ConfigError("the training split is empty")
    shuffle = config.data.shuffle
    if not sources.parts:
        return _shuffled_forever(sources.train, shuffle, config.seed)
    # Each source its own seed (spaced by a prime), so two sources never share an order.
    streams = [_shuffled_forever(part.train, shuffle, config.seed + 7919 * (i + 1))
               for i, part in enumerate(sources.parts)]
    return grain.MapDataset.mix(streams, list(sources.weights))


def train_documents(config: Config, sources: DataSources, process_index: int = 0, process_count: int = 1,
                    global_start: int = 0, local_start: int = 0) -> grain.MapDataset:
    """This process's endless stream of training documents (str), before tokenization.

    Process p takes positions p, p + P, p + 2P... of the global stream (from `global_start`), from
    its own `local_start` on: the starts are 0 except after a restore on another layout
    (`data_position`).
    """
    docs = global_documents(config, sources)
    if global_start:
        docs = docs[global_start:]
    docs = docs[process_index::process_count]
    return docs[local_start:] if local_start else docs


def _allow_grain_workers() -> None:
    """grain's worker processes read absl flags; a program that never parsed them must say so."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _own_arrays(batch: Batch) -> Batch:
    """Copies a batch out of the shared memory a worker process filled (so it is freed at once)."""
    return {k: np.array(v) for k, v in batch.items()}


class TrainIterator:
    """This process's endless, checkpointable iterator of training batches [batch_size // P, seq_len].

    Processes read disjoint documents (`train_documents`) without talking to each other; each
    tokenizes, packs and batches its own, in grain reader threads, or with `data.workers` in that
    many worker processes (each reading every W-th document of the process's stream and packing
    its own batches, which are then taken in turn). `data.prefetch` batches are made ahead.

    The state (`get_state`) is grain's pipeline state together with the layout it belongs to; see
    `data_position` for a restore on another number of processes or workers.
    """

    def __init__(self, config: Config, tokenizer: Tokenizer, sources: DataSources,
                 process_index: int = 0, process_count: int = 1):
        self._per_process = _check_process(config, process_index, process_count)
        self._config, self._tokenizer, self._sources = config, tokenizer, sources
        self.layout = position.Layout(process_index, process_count, config.data.workers)
        self._batches = self._open()

    def _open(self) -> Any:
        c, layout = self._config, self.layout
        seq_len, workers, prefetch = c.train.seq_len, c.data.workers, c.data.prefetch
        docs = train_documents(c, self._sources, layout.process_index, layout.process_count,
                               layout.global_start, layout.local_start)
        threads = max(1, _reader_threads() // max(1, workers))
        pieces = _tokenized_pieces(docs, self._tokenizer, seq_len, threads)
        if c.data.shuffle and c.data.shuffle_window > 1:
            pieces = grain.experimental.WindowShuffleIterDataset(
                pieces, window_size=c.data.shuffle_window, seed=(c.seed + 2) % 2**32)
        # More bins than rows per batch: short last pieces of documents find room, less padding.
        packed = _pack(pieces, seq_len, num_bins=2 * self._per_process, seed=(c.seed + 1) % 2**32,
                       shuffle_bins=c.data.shuffle)
        batches = packed.batch(self._per_process, drop_remainder=True).map(_to_batch)
        if workers:
            _allow_grain_workers()
            options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(1, prefetch))
            batches = batches.mp_prefetch(options).map(_own_arrays)
        elif prefetch:
            # Packing (~3 ms per 16x128 batch) then overlaps the step instead of preceding it.
            batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
        return iter(batches)

    def _reopen(self, layout: position.Layout) -> None:
        self.close()
        self.layout = layout
        self._batches = self._open()

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._batches)

    def get_state(self) -> dict:
        return position.wrap(self.layout, self._batches.get_state())

    def set_state(self, state: dict) -> None:
        """Resumes exactly from a state of this process saved with the same number of workers; with
        another number of workers or another pipeline shape, restarts at the slowest old reader's
        document (`data_position`)."""
        ours = self.layout
        saved, pipeline = position.unwrap(state, ours.process_index, ours.process_count)
        if (saved.process_index, saved.process_count) != (ours.process_index, ours.process_count):
            raise position.LayoutError(
                f"the data state of process {saved.process_index} of {saved.process_count} cannot resume process "
                f"{ours.process_index} of {ours.process_count} alone; use restore_from_saved with all saved states")
        if saved.same_readers(ours):
            if (saved.global_start, saved.local_start) != (ours.global_start, ours.local_start):
                self._reopen(saved)
            try:
                self._batches.set_state(pipeline)
                return
            except (KeyError, IndexError, TypeError, ValueError):
                # Saved by another pipeline shape (data.shuffle or data.shuffle_window changed, which
                # adds or drops grain's window shuffle): grain cannot take that state, but the document
                # position in it still says where to restart.
                why = "the data pipeline changed since the save (data.shuffle or data.shuffle_window)"
        else:
            why = f"the data position was saved with data.workers={saved.workers}, this run has {ours.workers}"
        local = min(position.reader_restarts(saved, pipeline))
        log.warning("%s: process %d restarts its documents at position %d (a few may be seen twice)", why,
                    ours.process_index, local)
        self._reopen(dataclasses.replace(ours, global_start=saved.global_start, local_start=local))

    def restore_from_saved(self, states: dict[tuple[int, int], dict]) -> None:
        """Resumes from the saved states of every process of a checkpoint ({(index, count): state}).

        With this process's own state, as `set_state`; saved by another number of processes, all of
        them restart the global stream at the lowest position any old reader had not fully fed.
        """
        ours = self.layout
        own = states.get((ours.process_index, ours.process_count))
        if own is not None:
            self.set_state(own)
            return
        counts = {count for _, count in states}
        if len(counts) != 1 or {index for index, _ in states} != set(range(next(iter(counts)))):
            raise position.LayoutError(f"the checkpoint's data states are incomplete: found {sorted(states)}")
        saved = [position.unwrap(state, index, count) for (index, count), state in sorted(states.items())]
        start = position.global_restart(saved)
        log.warning("the data position was saved by %d processes, this run has %d: the data restarts at "
                    "document %d of the shared stream, sliced for %d processes (a few may be seen twice)",
                    next(iter(counts)), ours.process_count, start, ours.process_count)
        self._reopen(dataclasses.replace(ours, global_start=start, local_start=0))

    def close(self) -> None:
        """Stops worker processes and prefetch threads (also done when the iterator is collected)."""
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()


def make_train_iterator(config: Config, tokenizer: Tokenizer, sources: DataSources,
                        process_index: int = 0, process_count: int = 1) -> TrainIterator:
    """Endless, checkpointable iterator of this process's training batches (`TrainIterator`)."""
    return TrainIterator(config, tokenizer, sources, process_index, process_count)


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


def iterator_state(it: TrainIterator) -> dict:
    """The iterator's position as a JSON-serialisable dict (grain states are nested ints)."""
    return json.loads(json.dumps(it.get_state()))  # fails loudly here, not in the checkpointer


def restore_iterator_state(it: TrainIterator, state: dict) -> None:
    """Moves `it` (from make_train_iterator with the same config and sources) to `state`."""
    it.set_state(state)


def has_own_saved_state(data_dir: str | os.PathLike, process_index: int, process_count: int) -> bool:
    """Whether a checkpoint's data item (a folder) holds a state for this process of this many.

    False when the checkpoint was written by another number of processes: restore its train state
    alone, then the data with `restore_from_checkpoint_dir`.
    """
    saved = position.saved_processes(data_dir)
    return not saved or (process_index, process_count) in saved


def restore_from_checkpoint_dir(it: TrainIterator, data_dir: str | os.PathLike) -> None:
    """Restores `it` from every process's saved state in a checkpoint's data folder."""
    states = position.read_saved_states(data_dir)
    if not states:
        raise position.LayoutError(f"{data_dir} holds no saved data states")
    it.restore_from_saved(states)
