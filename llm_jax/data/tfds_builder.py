"""Prepares a local corpus once as a TFDS ArrayRecord dataset (splits train/validation, feature text;
a corpus of seq2seq examples also the feature target, "text" holding the input).

Why TFDS for local files: the training loop then reads every source the same way (random access
through `as_data_source`, which grain needs for a global shuffle and checkpointable positions), and
the expensive part (walking, decoding, validating thousands of files) happens once per corpus.

No TensorFlow is needed: `DatasetInfo` is built directly and records are written as ArrayRecord.

Atomicity: TFDS's `download_and_prepare` writes the version folder as `incomplete.XXXXXX_1.0.0`
and renames it to `1.0.0` only after all splits and `dataset_info.json` are written, and
`is_prepared()` requires `dataset_info.json` inside a folder named like a version. An interrupted
preparation therefore never looks complete; it is redone on the next run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
import tqdm
from etils import epath

from llm_jax.config import ConfigError
from llm_jax.data import corpus as corpus_lib
from llm_jax.runtime.faults import first_line

log = logging.getLogger(__name__)

TRAIN = "train"
VALIDATION = "validation"
TARGET = "target"  # the feature of a seq2seq example's target (its input is "text")
_LOCK_NAME = ".prepare.lock"  # in the dataset's folder, held while it is being prepared


class LlmJaxLocalCorpus(tfds.core.GeneratorBasedBuilder):
    """A local corpus (`corpus_lib.Corpus`) as a TFDS dataset.

    The corpus is given to the constructor rather than to a BuilderConfig: the data folder is
    already keyed by the corpus fingerprint, so one builder version per folder is enough. Opening
    an already prepared folder needs no corpus (`corpus=None`).
    """

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS looks for a checksums file next to the builder's code through importlib.resources,
        # which fails for an editable install of llm_jax; the plain file path is what it needs.
        return epath.Path(__file__)

    def __init__(self, *, corpus: corpus_lib.Corpus | None = None, plan: corpus_lib.SplitPlan | None = None,
                 **kwargs):
        self._corpus = corpus
        self._plan = plan
        self._pairs = corpus is not None and bool(corpus.target_key)
        super().__init__(**kwargs)

    # TFDS prints "Downloading and preparing..." and "...downloaded and prepared" to stdout, which
    # would mix into the JSON that `llm-jax data prepare` prints; prepare_corpus logs the same facts.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="A local text corpus prepared by llm_jax: one document per record.",
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), **({TARGET: tfds.features.Text()} if self._pairs else {})}),
            # Counts found while reading; saved with the dataset so a reused one can report them.
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        if self._corpus is None:
            raise ValueError("preparing a local corpus needs the corpus (LlmJaxLocalCorpus(corpus=...))")
        plan = self._plan if self._plan is not None else plan_corpus(self._corpus)
        self.info.metadata.update(documents=plan.stats.documents, bytes=plan.stats.bytes,
                                  skipped=plan.stats.skipped, skipped_reasons=dict(plan.stats.reasons))
        counts = {TRAIN: plan.train, VALIDATION: plan.validation}
        return {split: self._generate_examples(split, plan) for split, n in counts.items() if n > 0}

    def _generate_examples(self, split: str, plan: corpus_lib.SplitPlan):
        # Each split reads the corpus again and keeps its share: cheaper than holding it in memory.
        for doc in corpus_lib.iter_split(self._corpus, split, plan):
            yield doc.key, {"text": doc.text, **({TARGET: doc.target} if self._pairs else {})}


def plan_corpus(corpus: corpus_lib.Corpus, progress: bool = False) -> corpus_lib.SplitPlan:
    """The counting pass before writing: an empty corpus is refused before anything is written, and
    the plan keeps both splits non-empty (TFDS refuses to write an empty split)."""
    # disable=None: no bar where stderr is not a terminal, so redirected logs get no redrawn lines.
    with tqdm.tqdm(total=len(corpus.files), desc=f"reading {corpus.kind} corpus", unit="file",
                   disable=None if progress else True, dynamic_ncols=True, mininterval=1.0) as bar:
        plan = corpus_lib.plan_splits(corpus, on_file=bar.update)
    if plan.stats.documents == 0:
        reasons = ", ".join(f"{n} {why}" for why, n in plan.stats.reasons.most_common()) or "none readable"
        raise ConfigError(f"{_what(corpus)} yields no documents ({len(corpus.files)} files; skipped: {reasons})")
    return plan


def _what(corpus: corpus_lib.Corpus) -> str:
    return "data.source=default" if corpus.kind == "default" else f"data.path='{corpus.pattern}'"


@dataclasses.dataclass(frozen=True)
class PreparedCorpus:
    builder: LlmJaxLocalCorpus
    data_dir: Path
    documents: int
    bytes: int  # UTF-8 bytes of the documents
    skipped: int
    skipped_reasons: dict[str, int]  # e.g. {"empty": 1, "binary": 2}
    reused: bool  # True when an earlier run's preparation was found and nothing was written

    def split_sizes(self) -> dict[str, int]:
        return {name: info.num_examples for name, info in self.builder.info.splits.items()}

    def split_shards(self) -> dict[str, int]:
        """ArrayRecord files per split."""
        return {name: info.num_shards for name, info in self.builder.info.splits.items()}

    def data_source(self, split: str) -> Sequence[Any]:
        """Random access to one split's records; a split without documents is an empty list."""
        if split not in self.builder.info.splits:
            return []
        return self.builder.as_data_source(split)


def default_prepared_dir() -> Path:
    return Path("~/.cache/llm_jax/datasets").expanduser()


def prepared_data_dir(corpus: corpus_lib.Corpus, prepared_dir: str | os.PathLike | None) -> Path:
    """The folder for this exact corpus: `<prepared_dir>/<kind>-<fingerprint>`."""
    base = Path(prepared_dir).expanduser() if prepared_dir else default_prepared_dir()
    return base / f"{corpus.kind}-{corpus.fingerprint()[:20]}"


def _is_prepared(builder: LlmJaxLocalCorpus) -> bool:
    """`builder.is_prepared()` without its warning about a version folder that does not exist yet.

    TFDS warns 'Variant folder ... has no dataset_info.json' whenever the answer is no, which on a
    first preparation is the expected answer, not a fault.
    """
    if not (Path(builder.data_dir) / "dataset_info.json").exists():
        return False
    return builder.is_prepared()


def _shard_count(num_shards: int, plan: corpus_lib.SplitPlan) -> int | None:
    """ArrayRecord files per split: `num_shards`, at most the documents of the smaller split; None: TFDS decides."""
    if not num_shards:
        return None
    smallest = min(n for n in (plan.train, plan.validation) if n > 0)
    if num_shards > smallest:  # TFDS gives every split the same count, and a file needs a document
        log.warning("data.num_shards=%d is more than the %d documents of the smaller split: writing %d shards "
                    "per split", num_shards, smallest, smallest)
        return smallest
    return num_shards


def _open(data_dir: Path, corpus: corpus_lib.Corpus | None,
          plan: corpus_lib.SplitPlan | None = None) -> LlmJaxLocalCorpus:
    return LlmJaxLocalCorpus(corpus=corpus, plan=plan, data_dir=os.fspath(data_dir), file_format="array_record")


def prepare_corpus(corpus: corpus_lib.Corpus, prepared_dir: str | os.PathLike | None = None, *,
                   num_shards: int = 0, progress: bool = False) -> PreparedCorpus:
    """Prepares `corpus` unless an identical preparation exists; returns the opened dataset.

    `num_shards`: ArrayRecord files per split (0: TFDS decides by size, 64 MB to 1 GiB a file), at
    most the documents of the smaller split (TFDS gives every split the same count). A dataset
    prepared earlier with another shard count is reused: sharding does not change its records.
    Raises ConfigError when the corpus yields no documents.
    """
    data_dir = prepared_data_dir(corpus, prepared_dir)
    builder = _open(data_dir, corpus)
    reused = _is_prepared(builder) and _damage(builder) is None
    if not reused:
        with _preparing(data_dir):  # another process may have prepared it while this one waited
            builder = _open(data_dir, corpus)
            reused = _is_prepared(builder) and not _removed_if_damaged(builder, data_dir)
            if not reused:
                builder = _prepare(corpus, data_dir, num_shards, progress)
    metadata = builder.info.metadata or {}
    prepared = PreparedCorpus(
        builder=builder,
        data_dir=data_dir,
        documents=int(metadata.get("documents", 0)),
        bytes=int(metadata.get("bytes", 0)),
        skipped=int(metadata.get("skipped", 0)),
        skipped_reasons={str(k): int(v) for k, v in dict(metadata.get("skipped_reasons", {})).items()},
        reused=reused,
    )
    sizes = prepared.split_sizes()
    log.info("%s corpus in %s: %d documents, %.1f MB (%s), train %d, validation %d%s",
             corpus.kind, data_dir, prepared.documents, prepared.bytes / 1e6,
             describe_skips(prepared.skipped_reasons), sizes.get(TRAIN, 0), sizes.get(VALIDATION, 0),
             " (reused)" if reused else "")
    return prepared


def _prepare(corpus: corpus_lib.Corpus, data_dir: Path, num_shards: int, progress: bool) -> LlmJaxLocalCorpus:
    """Writes the dataset (the caller holds `_preparing(data_dir)`); returns it opened from disk."""
    log.info("preparing %s corpus (%d files) as a TFDS dataset in %s", corpus.kind, len(corpus.files), data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        plan = plan_corpus(corpus, progress)
        shards = _shard_count(num_shards, plan)
        # TFDS's own bars (one 250-character line per shard) only where someone watches a terminal.
        tfds.display_progress_bar(progress and sys.stderr.isatty())
        _open(data_dir, corpus, plan).download_and_prepare(
            file_format="array_record",
            download_dir=os.fspath(data_dir / "downloads"),
            download_config=tfds.download.DownloadConfig(num_shards=shards),
        )
    except ConfigError:
        shutil.rmtree(data_dir, ignore_errors=True)  # no documents: leave nothing to reuse
        raise
    except OSError:
        # Another process (a second host on a shared disk) may have finished the same
        # preparation first; its rename then wins and ours fails. Use theirs if it is complete.
        if not _is_prepared(_open(data_dir, None)):
            raise
    shutil.rmtree(data_dir / "downloads", ignore_errors=True)  # always empty: nothing is downloaded
    return _open(data_dir, corpus)  # re-read so info and metadata come from disk


@contextlib.contextmanager
def _preparing(data_dir: Path) -> Iterator[None]:
    """One preparation of `data_dir` at a time: processes of one host (or hosts sharing the disk)
    wait for each other, and the later ones reuse what the first prepared. Held, it also makes the
    `incomplete.*` folders of a preparation that was killed (TFDS writes there, then renames) safe
    to remove: no one else is writing them."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / _LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        for stale in data_dir.glob("*/incomplete.*"):
            log.info("removing %s, left by a preparation that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)
        yield


def _damage(builder: LlmJaxLocalCorpus) -> str | None:
    """'FILE: why' for the first ArrayRecord file of a prepared dataset that is cut short or
    unreadable (a full disk, a copy cut short), else None.

    Reads each file's footer and record count only, so it is cheap enough for every run; without
    it the damage would surface mid-run as 'Corrupted Riegeli/records file' in a data reader.
    """
    from array_record.python.array_record_module import ArrayRecordReader

    for info in builder.info.splits.values():
        for path, expected in zip(info.filepaths, info.shard_lengths):
            try:
                reader = ArrayRecordReader(os.fspath(path))
                try:
                    found = reader.num_records()
                finally:
                    reader.close()
            except (RuntimeError, OSError, ValueError) as e:
                return f"{path}: {first_line(e)}"
            if found != expected:
                return f"{path}: {found} records where {expected} were written"
    return None


def _removed_if_damaged(builder: LlmJaxLocalCorpus, data_dir: Path) -> bool:
    """Removes a damaged prepared dataset so that it is prepared again (it is only a cache of the
    corpus); True when it did."""
    damage = _damage(builder)
    if damage is None:
        return False
    log.warning("the prepared dataset %s is damaged (%s): preparing it again", data_dir, damage)
    for child in data_dir.iterdir():
        if child.name == _LOCK_NAME:
            continue  # held by this process: a new lock file would let a second preparer in
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    return True


def describe_skips(reasons: dict[str, int]) -> str:
    """'3 skipped: 2 empty, 1 binary' or 'nothing skipped', for logs."""
    total = sum(reasons.values())
    if not total:
        return "nothing skipped"
    parts = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda item: (-item[1], item[0])))
    return f"{total} skipped: {parts}"

