"""The input pipeline: document sources -> grain (shuffle, tokenize, chunk, pack, batch) -> numpy.
The training batches come from virtual shards of the document stream (`data/shards.py`).

Sources are random-access sequences of documents (TFDS ArrayRecord data sources), because grain
then shuffles globally by index and an iterator's position is a few integers: checkpointing the
pipeline costs nothing and restoring it yields exactly the batch that would have come next.

Targets never cross documents. A document is [bos] + ids + [eos]; it is cut into pieces of at most
seq_len + 1 tokens that overlap by one token (so every next-token target is kept once), and each
piece gives inputs = piece[:-1], targets = piece[1:]. Pieces are packed into rows of seq_len with
segment ids (1, 2, ... per piece, 0 on padding) and positions (0-based within the piece), which the
model uses to mask attention across pieces.

Masked LM (`config.objective == "mlm"`): a document's ids are cut into chunks of seq_len - 2, each
becoming a piece [CLS] chunk [SEP] masked by `objectives.mask_tokens` (inputs = the corrupted ids,
targets = the original ids, weights = 1 on the selected positions only); the pieces are packed the
same way, the weights with them. A document's rng is a pure function of the seed and its place in
the stream (`cut_documents`), so the masks of a step never depend on the layout, the workers or
a resume, and a document seen again in a later epoch gets fresh masks.

Batch layout (every array [rows, seq_len]: the global batch, or the rows a process holds): inputs,
targets, segment_ids, positions (int32) and weights (float32: 1 on real targets, 0 on padding; for
mlm 1 on the selected positions only).

An encoder-decoder (span, seq2seq) has two sides. The encoder side is encoder_inputs,
encoder_segment_ids, encoder_positions [rows, seq_len] (models/build.ENCODER_KEYS); the decoder side
is inputs, targets, segment_ids, positions, weights [rows, target_len] (`Config.target_len`),
where inputs are the targets shifted right by one within each segment, starting with pad (id 0, T5's
decoder start). An example's two sides are packed into the same row with the same segment id, so
neither self- nor cross-attention crosses examples.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from llm_jax.config import Config, ConfigError, DataConfig, MixtureSource
from llm_jax.data import corpus as corpus_lib
from llm_jax.data import objectives, tfds_builder
from llm_jax.data.tokenizer import Tokenizer

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


class DocumentCutter:
    """A document (str) -> its pieces (`document_pieces`). Picklable: worker processes get it."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len

    def __call__(self, text: str) -> list[dict[str, np.ndarray]]:
        tok = self.tokenizer
        return document_pieces(tok.encode(text), self.seq_len, tok.bos_id, tok.eos_id)


def masked_pieces(ids: list[int], seq_len: int, cls_id: int, sep_id: int) -> list[np.ndarray]:
    """Cuts ids into [CLS] chunk [SEP] pieces of at most seq_len tokens (chunks of seq_len - 2 ids).

    No overlap: a masked LM predicts tokens in place, so no target is lost at a cut. An empty
    document gives no piece (it would hold nothing to predict).
    """
    chunk = seq_len - 2
    tokens = np.asarray(ids, dtype=np.int32)
    return [np.concatenate([[cls_id], tokens[start:start + chunk], [sep_id]]).astype(np.int32)
            for start in range(0, len(tokens), chunk)]


class MaskedDocumentCutter:
    """(index, document) -> its masked pieces, with the rng of `seed_words` + [index]. Picklable.

    `index` is the document's place in its stream (grain's `map_with_index`), so the masks are a
    pure function of the seed words and that place.
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, seed_words: tuple[int, ...]):
        if None in (tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id):
            raise ConfigError(f"train.objective=mlm needs a tokenizer with [CLS], [SEP] and [MASK]; {tokenizer!r} "
                              "lacks some")
        if seq_len < 3:
            raise ConfigError(f"train.seq_len={seq_len} is too short for mlm: [CLS] and [SEP] take two tokens")
        self.tokenizer, self.seq_len, self.seed_words = tokenizer, seq_len, tuple(int(w) for w in seed_words)
        self.special_ids = np.asarray(tokenizer.special_ids, dtype=np.int64)

    def __call__(self, index: int, text: str) -> list[dict[str, np.ndarray]]:
        tok = self.tokenizer
        rng = np.random.default_rng([*self.seed_words, int(index)])
        pieces = []
        for piece in masked_pieces(tok.encode(text), self.seq_len, tok.cls_id, tok.sep_id):
            inputs, targets, weights = objectives.mask_tokens(
                piece, rng, mask_id=tok.mask_id, vocab_size=tok.vocab_size, special_ids=self.special_ids)
            pieces.append({"inputs": inputs, "targets": targets, "weights": weights})
        return pieces


def cut_documents(config: Config, tokenizer: Tokenizer, docs: grain.MapDataset,
                  seed_words: tuple[int, ...]) -> grain.MapDataset:
    """Documents (str) -> their lists of pieces, for the run's objective.

    clm: `DocumentCutter`. mlm: `MaskedDocumentCutter`, whose rng for the document at index i of
    `docs` is seeded by `seed_words` + [i]: the caller's words name the stream (seed, shard).
    """
    if config.objective == "mlm":
        return docs.map_with_index(MaskedDocumentCutter(tokenizer, config.train.seq_len, seed_words))
    return docs.map(DocumentCutter(tokenizer, config.train.seq_len))


class _Pieces(grain.experimental.FlatMapTransform):
    """Flattens the per-document lists of pieces into single pieces."""

    max_fan_out = 1 << 30  # only used by MapDataset flat maps; ours is on an IterDataset

    def flat_map(self, element: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return element


def flatten_pieces(per_document: grain.IterDataset) -> grain.IterDataset:
    """Lists of pieces, one per document -> the pieces one by one, in order."""
    return grain.experimental.FlatMapIterDataset(per_document, _Pieces())


def _to_batch(packed: dict[str, np.ndarray]) -> Batch:
    """grain's packed feature names -> the trainer's batch layout.

    Pieces that carry their own weights (mlm) keep them; otherwise every real token weighs 1.
    """
    segment_ids = packed["inputs_segment_ids"].astype(np.int32)
    weights = packed["weights"] if "weights" in packed else segment_ids > 0
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": segment_ids,
        "positions": packed["inputs_positions"].astype(np.int32),
        "weights": weights.astype(np.float32),
    }


def packed_batches(pieces: grain.IterDataset, seq_len: int, rows: int, num_bins: int, seed: int,
                   shuffle_bins: bool, drop_remainder: bool, with_weights: bool = False) -> grain.IterDataset:
    """Pieces -> rows of seq_len (first-fit packing over `num_bins` bins) -> batches of `rows` rows.

    `with_weights`: the pieces carry a "weights" feature (mlm), packed beside inputs and targets.
    """
    length_struct = {"inputs": seq_len, "targets": seq_len}
    if with_weights:
        length_struct["weights"] = seq_len
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces,
        length_struct=length_struct,
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
    )
    return packed.batch(rows, drop_remainder=drop_remainder).map(_to_batch)


# ----------------------------------------------------------------------------- documents and eval batches


def _shuffled_forever(split: Any, shuffle: bool, seed: int) -> grain.MapDataset:
    docs = split if isinstance(split, grain.MapDataset) else grain.MapDataset.source(split)
    if shuffle:
        docs = docs.shuffle(seed=seed % 2**32)
    return docs.repeat()


def global_documents(config: Config, sources: DataSources) -> grain.MapDataset:
    """The one endless stream of training documents, in order, the same for every layout of a run.

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


# The masks of the eval split, the same whatever train's seed: eval losses of runs compare.
EVAL_MASK_SEED_WORDS = (0x6D6C6D, 0)


def _pad_rows(batch: Batch, rows: int) -> Batch:
    """Adds all-zero rows (weight 0) so a short last eval batch keeps the static batch shape."""
    missing = rows - batch["inputs"].shape[0]
    if missing <= 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def make_eval_batches(config: Config, tokenizer: Tokenizer, sources: DataSources,
                      rows: list[tuple[int, int]] | None = None) -> list[Batch]:
    """At most train.eval_batches batches of the eval split, the same on every run.

    No shuffle; for mlm the masks of eval document i come from a fixed rng (`EVAL_MASK_SEED_WORDS`
    + [i], not the run's seed), so every eval of every run scores the same positions. Every process
    builds the same global batches of train.batch_size rows and keeps the global row ranges `rows`
    its devices hold (None: all), so all processes get the same number of batches (a collective
    eval step would hang otherwise). An empty eval split gives [].
    """
    if len(sources.eval) == 0:
        return []
    global_batch, seq_len = config.train.batch_size, config.train.seq_len
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)  # tokenizing holds the GIL: one thread
    per_document = cut_documents(config, tokenizer, grain.MapDataset.source(sources.eval), EVAL_MASK_SEED_WORDS)
    pieces = flatten_pieces(per_document.to_iter_dataset(read))
    batches = packed_batches(pieces, seq_len, global_batch, num_bins=global_batch, seed=0, shuffle_bins=False,
                             drop_remainder=False, with_weights=config.objective == "mlm")
    spans = rows if rows is not None else [(0, global_batch)]
    out = []
    for batch in itertools.islice(iter(batches), config.train.eval_batches):
        batch = _pad_rows(batch, global_batch)
        out.append({k: np.concatenate([v[start:stop] for start, stop in spans]) for k, v in batch.items()})
    return out
