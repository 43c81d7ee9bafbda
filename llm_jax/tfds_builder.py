"""Prepares a local corpus once as a TFDS ArrayRecord dataset (splits train/validation, feature text).

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

import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from llm_jax import corpus as corpus_lib
from llm_jax.config import ConfigError

log = logging.getLogger(__name__)

TRAIN = "train"
VALIDATION = "validation"


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

    def __init__(self, *, corpus: corpus_lib.Corpus | None = None, **kwargs):
        self._corpus = corpus
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="A local text corpus prepared by llm_jax: one document per record.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            # Counts found while reading; saved with the dataset so a reused one can report them.
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        if self._corpus is None:
            raise ValueError("preparing a local corpus needs the corpus (LlmJaxLocalCorpus(corpus=...))")
        # One counting pass first: an empty corpus is refused before anything is written, and the
        # plan keeps both splits non-empty (TFDS refuses to write an empty split).
        plan = corpus_lib.plan_splits(self._corpus)
        if plan.stats.documents == 0:
            raise ConfigError(f"{_what(self._corpus)} yields no documents ({len(self._corpus.files)} files, "
                              f"{plan.stats.skipped} skipped as empty, binary or malformed)")
        self.info.metadata.update(documents=plan.stats.documents, skipped=plan.stats.skipped,
                                  skipped_reasons=dict(plan.stats.reasons))
        counts = {TRAIN: plan.train, VALIDATION: plan.validation}
        return {split: self._generate_examples(split, plan) for split, n in counts.items() if n > 0}

    def _generate_examples(self, split: str, plan: corpus_lib.SplitPlan):
        # Each split reads the corpus again and keeps its share: cheaper than holding it in memory.
        for doc in corpus_lib.iter_split(self._corpus, split, plan):
            yield doc.key, {"text": doc.text}


def _what(corpus: corpus_lib.Corpus) -> str:
    return "data.source=default" if corpus.kind == "default" else f"data.path='{corpus.pattern}'"


@dataclasses.dataclass(frozen=True)
class PreparedCorpus:
    builder: LlmJaxLocalCorpus
    data_dir: Path
    documents: int
    skipped: int
    reused: bool  # True when an earlier run's preparation was found and nothing was written

    def split_sizes(self) -> dict[str, int]:
        return {name: info.num_examples for name, info in self.builder.info.splits.items()}

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


def _open(data_dir: Path, corpus: corpus_lib.Corpus | None) -> LlmJaxLocalCorpus:
    return LlmJaxLocalCorpus(corpus=corpus, data_dir=os.fspath(data_dir), file_format="array_record")


def prepare_corpus(corpus: corpus_lib.Corpus, prepared_dir: str | os.PathLike | None = None) -> PreparedCorpus:
    """Prepares `corpus` unless an identical preparation exists; returns the opened dataset.

    Raises ConfigError when the corpus yields no documents.
    """
    data_dir = prepared_data_dir(corpus, prepared_dir)
    builder = _open(data_dir, corpus)
    reused = builder.is_prepared()
    if not reused:
        log.info("preparing %s corpus (%d files) as a TFDS dataset in %s", corpus.kind, len(corpus.files), data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            builder.download_and_prepare(
                file_format="array_record",
                download_dir=os.fspath(data_dir / "downloads"),
            )
        except ConfigError:
            shutil.rmtree(data_dir, ignore_errors=True)  # no documents: leave nothing to reuse
            raise
        except OSError:
            # Another process (a second host on a shared disk) may have finished the same
            # preparation first; its rename then wins and ours fails. Use theirs if it is complete.
            if not _open(data_dir, None).is_prepared():
                raise
        shutil.rmtree(data_dir / "downloads", ignore_errors=True)  # always empty: nothing is downloaded
        builder = _open(data_dir, corpus)  # re-read so info and metadata come from disk
    metadata = builder.info.metadata or {}
    prepared = PreparedCorpus(
        builder=builder,
        data_dir=data_dir,
        documents=int(metadata.get("documents", 0)),
        skipped=int(metadata.get("skipped", 0)),
        reused=reused,
    )
    sizes = prepared.split_sizes()
    log.info("%s corpus in %s: %d documents (%d skipped: %s), train %d, validation %d%s",
             corpus.kind, data_dir, prepared.documents, prepared.skipped,
             metadata.get("skipped_reasons", {}), sizes.get(TRAIN, 0), sizes.get(VALIDATION, 0),
             " (reused)" if reused else "")
    return prepared

