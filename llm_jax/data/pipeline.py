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
neither self- nor cross-attention crosses examples: grain's first-fit packing places an example only
in a row where every one of its features fits, and numbers it there with one segment id for all of
them (checked by tests/test_data.py, encdec_examples).

Span corruption (`config.objective == "span"`, T5's pretraining): a document's ids (no bos) are cut
into pieces of `objectives.span_piece_length` ids (the last shorter), so that a full piece's
corrupted inputs fill seq_len and its targets target_len; each piece is corrupted by
`objectives.span_corrupt` with the rng of the seed and the document's place, as for mlm.
Seq2seq (`config.objective == "seq2seq"`): the documents are (input, target) pairs (`PairSource`);
each is one example, input ids + [eos] cut to seq_len and target ids + [eos] cut to target_len (the
eos kept last).
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
from llm_jax.runtime.faults import first_line

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")
# An encoder-decoder's batch has these too, [rows, seq_len] (the same names as models/build.ENCODER_KEYS).
ENCODER_BATCH_KEYS = ("encoder_inputs", "encoder_segment_ids", "encoder_positions")
ENCODER_DECODER_OBJECTIVES = ("span", "seq2seq")
# The decoder's first input of every example: pad, as in T5 (generation starts from it too).
DECODER_START_ID = 0


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

    @staticmethod
    def _text(record: Any, key: str) -> str:
        value = record[key]
        if isinstance(value, np.ndarray):
            value = value.item()
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

    def __getitem__(self, index: int) -> str:
        return self._text(self._source[int(index)], self._text_key)

    def __repr__(self) -> str:
        return f"TextSource({len(self)} documents, key={self._text_key!r})"


class PairSource(TextSource):
    """A TFDS data source seen as a sequence of seq2seq examples: (input, target) tuples of `str`.

    The tokenizer sample reads both texts of each (tokenizer.sample_documents)."""

    def __init__(self, source: Any, input_key: str, target_key: str):
        super().__init__(source, input_key)
        self._target_key = target_key

    def __getitem__(self, index: int) -> tuple[str, str]:
        record = self._source[int(index)]
        return self._text(record, self._text_key), self._text(record, self._target_key)

    def __repr__(self) -> str:
        return f"PairSource({len(self)} examples, keys={self._text_key!r}, {self._target_key!r})"


@dataclasses.dataclass(frozen=True)
class DataSources:
    """Random-access sources of documents for each split: str, or (input, target) pairs of str for
    a seq2seq run (`PairSource`).

    A mixture keeps its sources in `parts` (with their `weights`): training draws from each part's
    own endless stream. Its `train` and `eval` are weighted mixes of the parts' splits, for the
    tokenizer sample and the held-out batches.
    """

    train: Any  # __len__ and __getitem__ -> str (seq2seq: (input, target))
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
    return ConfigError(f"data.tfds_name: dataset '{d.tfds_name}' in {where} cannot be read: {first_line(error)}")


def _open_tfds(d: DataConfig, pairs: bool = False) -> DataSources:
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
    keys = ("data.input_key", "data.target_key") if pairs else ("data.text_key",)
    for key in keys:
        feature = getattr(d, key.split(".")[1])
        if features is not None and feature not in features:
            raise ConfigError(f"{key}: dataset '{d.tfds_name}' has no feature '{feature}' "
                              f"(it has: {', '.join(sorted(features.keys()))})")
    description = (f"tfds {d.tfds_name}: {len(train)} train ({d.tfds_train_split}), "
                   f"{len(eval_)} eval ({d.tfds_eval_split}) records")
    if pairs:
        return DataSources(PairSource(train, d.input_key, d.target_key), PairSource(eval_, d.input_key, d.target_key),
                           description)
    return DataSources(TextSource(train, d.text_key), TextSource(eval_, d.text_key), description)


def _open_local(d: DataConfig, progress: bool, pairs: bool = False) -> DataSources:
    corpus = corpus_lib.find_corpus(d, pairs=pairs)
    prepared = tfds_builder.prepare_corpus(corpus, d.prepared_dir or None, num_shards=d.num_shards,
                                           progress=progress)
    stats = corpus_lib.CorpusStats(documents=prepared.documents, skipped=prepared.skipped)
    splits = [prepared.data_source(split) for split in (tfds_builder.TRAIN, tfds_builder.VALIDATION)]
    if pairs:  # the prepared dataset's features: the input as "text", and "target"
        train, eval_ = (PairSource(split, "text", tfds_builder.TARGET) for split in splits)
    else:
        train, eval_ = (TextSource(split, "text") for split in splits)
    return DataSources(train, eval_, corpus.describe(stats), documents=prepared.documents,
                       skipped=prepared.skipped_reasons)


def _open_one(d: DataConfig, progress: bool, pairs: bool = False) -> DataSources:
    return _open_tfds(d, pairs) if d.source == "tfds" else _open_local(d, progress, pairs)


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
    pairs = config.objective == "seq2seq"
    if pairs and d.source not in ("jsonl", "tfds"):
        raise ConfigError(f"data.source={d.source} holds text, but train.objective=seq2seq reads (input, target) "
                          "examples: use data.source=jsonl or tfds with data.input_key and data.target_key")
    sources = _open_mixture(d, progress) if d.source == "mixture" else _open_one(d, progress, pairs)
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


def decoder_inputs(targets: np.ndarray) -> np.ndarray:
    """An encoder-decoder's decoder inputs: the targets shifted right by one, after DECODER_START_ID."""
    return np.concatenate([[DECODER_START_ID], targets[:-1]]).astype(np.int32)


class SpanDocumentCutter:
    """(index, document) -> its span-corrupted pieces, with the rng of `seed_words` + [index]. Picklable.

    The document's ids are cut into pieces of `objectives.span_piece_length(seq_len, target_len)`
    (the last shorter; an empty document gives none), each corrupted into encoder_inputs and
    targets; as for mlm, the corruption is a pure function of the seed words and the document's place.
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, target_len: int, extra_ids: int,
                 seed_words: tuple[int, ...]):
        self.piece_length = objectives.span_piece_length(seq_len, target_len)
        spans = objectives.noise_counts(self.piece_length)[1]
        self.sentinel_ids = tuple(getattr(tokenizer, "sentinel_ids", ()))[:extra_ids]
        if len(self.sentinel_ids) < max(spans, 1):
            raise ConfigError(f"train.objective=span needs a tokenizer with the sentinels <extra_id_0> ... "
                              f"<extra_id_{max(spans, 1) - 1}>; {tokenizer!r} has {len(self.sentinel_ids)} of them")
        self.tokenizer, self.seed_words = tokenizer, tuple(int(w) for w in seed_words)

    def __call__(self, index: int, text: str) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng([*self.seed_words, int(index)])
        ids = np.asarray(self.tokenizer.encode(text), dtype=np.int32)
        pieces = []
        for start in range(0, len(ids), self.piece_length):
            inputs, targets = objectives.span_corrupt(ids[start:start + self.piece_length], rng,
                                                      sentinel_ids=self.sentinel_ids, eos_id=self.tokenizer.eos_id)
            pieces.append({"encoder_inputs": inputs, "inputs": decoder_inputs(targets), "targets": targets})
        return pieces


class PairCutter:
    """An (input, target) example -> its one piece. Picklable.

    Each side is its ids + [eos], cut to its length (seq_len, target_len) with the eos kept last: an
    over-long example is truncated, never dropped (the run log counts them: `cut_pairs`).
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, target_len: int):
        self.tokenizer, self.seq_len, self.target_len = tokenizer, seq_len, target_len

    def _side(self, text: str, length: int) -> np.ndarray:
        return np.asarray([*self.tokenizer.encode(text)[:length - 1], self.tokenizer.eos_id], dtype=np.int32)

    def __call__(self, pair: tuple[str, str]) -> list[dict[str, np.ndarray]]:
        source, target = pair
        targets = self._side(target, self.target_len)
        return [{"encoder_inputs": self._side(source, self.seq_len), "inputs": decoder_inputs(targets),
                 "targets": targets}]


def cut_pairs(config: Config, tokenizer: Tokenizer, pairs: Any, limit: int = 1000) -> tuple[int, int, int]:
    """(examples read, inputs cut, targets cut) among the first `limit` (input, target) pairs: those
    `PairCutter` cuts to train.seq_len and Config.target_len. A cut target loses its end and the model
    learns to stop there, so the run log says how many (a sample: tokenizing is the cost)."""
    read = min(len(pairs), limit)
    inputs_cut = targets_cut = 0
    for i in range(read):
        source, target = pairs[i]
        inputs_cut += len(tokenizer.encode(source)) > config.train.seq_len - 1  # one place is the eos
        targets_cut += len(tokenizer.encode(target)) > config.target_len - 1
    return read, inputs_cut, targets_cut


# What each objective makes of a document and how its pieces pack: the two functions below are the
# one place that tells the objectives apart.


def cut_documents(config: Config, tokenizer: Tokenizer, docs: grain.MapDataset,
                  seed_words: tuple[int, ...]) -> grain.MapDataset:
    """Documents -> their lists of pieces, for the run's objective.

    clm: `DocumentCutter`. mlm: `MaskedDocumentCutter` and span: `SpanDocumentCutter`, whose rng for
    the document at index i of `docs` is seeded by `seed_words` + [i]: the caller's words name the
    stream (seed, shard). seq2seq: `PairCutter` (documents are (input, target) pairs).
    """
    c, seq_len = config, config.train.seq_len
    if c.objective == "mlm":
        return docs.map_with_index(MaskedDocumentCutter(tokenizer, seq_len, seed_words))
    if c.objective == "span":
        return docs.map_with_index(SpanDocumentCutter(tokenizer, seq_len, c.target_len, c.tokenizer.extra_ids,
                                                      seed_words))
    if c.objective == "seq2seq":
        return docs.map(PairCutter(tokenizer, seq_len, c.target_len))
    return docs.map(DocumentCutter(tokenizer, seq_len))


def piece_lengths(config: Config) -> dict[str, int]:
    """The row length of each feature of the objective's pieces (grain's packing `length_struct`):
    clm inputs, targets [seq_len]; mlm also weights; span and seq2seq encoder_inputs [seq_len] and
    inputs, targets [Config.target_len]."""
    seq_len = config.train.seq_len
    if config.objective in ENCODER_DECODER_OBJECTIVES:
        return {"encoder_inputs": seq_len, "inputs": config.target_len, "targets": config.target_len}
    lengths = {"inputs": seq_len, "targets": seq_len}
    if config.objective == "mlm":
        lengths["weights"] = seq_len
    return lengths


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

    Pieces that carry their own weights (mlm) keep them; otherwise every real (decoder) token weighs
    1. An encoder-decoder's encoder side comes with its own segment ids and positions.
    """
    segment_ids = packed["inputs_segment_ids"].astype(np.int32)
    weights = packed["weights"] if "weights" in packed else segment_ids > 0
    batch = {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": segment_ids,
        "positions": packed["inputs_positions"].astype(np.int32),
        "weights": weights.astype(np.float32),
    }
    if "encoder_inputs" in packed:
        batch["encoder_inputs"] = packed["encoder_inputs"].astype(np.int32)
        batch["encoder_segment_ids"] = packed["encoder_inputs_segment_ids"].astype(np.int32)
        batch["encoder_positions"] = packed["encoder_inputs_positions"].astype(np.int32)
    return batch


def packed_batches(pieces: grain.IterDataset, lengths: dict[str, int], rows: int, num_bins: int, seed: int,
                   shuffle_bins: bool, drop_remainder: bool, max_documents: int | None = None) -> grain.IterDataset:
    """Pieces -> rows (first-fit packing over `num_bins` bins) -> batches of `rows` rows.

    `lengths` is the row length of each feature of the pieces (`piece_lengths`); a piece goes into
    the first row where all its features fit, with one segment id for all of them, and where fewer
    than `max_documents` pieces are (model.max_documents_per_row: the fused cuDNN attention is
    compiled for that many; None: no limit).
    """
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces,
        length_struct=dict(lengths),
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
        max_sequences_per_bin=max_documents,
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


# The masks (mlm) and noise spans (span) of the eval split, the same whatever train's seed: eval
# losses of runs compare.
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

    No shuffle; for mlm (span) the masks (noise spans) of eval document i come from a fixed rng
    (`EVAL_MASK_SEED_WORDS` + [i], not the run's seed), so every eval of every run scores the same
    positions. Every process
    builds the same global batches of train.batch_size rows and keeps the global row ranges `rows`
    its devices hold (None: all), so all processes get the same number of batches (a collective
    eval step would hang otherwise). An empty eval split gives [].
    """
    if len(sources.eval) == 0:
        return []
    global_batch = config.train.batch_size
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)  # tokenizing holds the GIL: one thread
    per_document = cut_documents(config, tokenizer, grain.MapDataset.source(sources.eval), EVAL_MASK_SEED_WORDS)
    pieces = flatten_pieces(per_document.to_iter_dataset(read))
    batches = packed_batches(pieces, piece_lengths(config), global_batch, num_bins=global_batch, seed=0,
                             shuffle_bins=False, drop_remainder=False,
                             max_documents=config.model.resolved_max_documents_per_row)
    spans = rows if rows is not None else [(0, global_batch)]
    out = []
    for batch in itertools.islice(iter(batches), config.train.eval_batches):
        batch = _pad_rows(batch, global_batch)
        out.append({k: np.concatenate([v[start:stop] for start, stop in spans]) for k, v in batch.items()})
    return out
