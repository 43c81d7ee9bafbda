"""`llm-jax tokenizer train` and `llm-jax data prepare`: the data work of a run, done ahead of it.

Both write where `llm-jax train` with the same config looks: prepared datasets under
`data.prepared_dir` (keyed by the corpus, reused), the tokenizer in `WORKDIR/tokenizer/` (or, with
`--out`, a folder that `tokenizer.path=DIR/spm.model` points a run at).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import tqdm

from llm_jax.config import Config, ConfigError, DataConfig
from llm_jax.data import corpus as corpus_lib
from llm_jax.data import pipeline as data_lib
from llm_jax.data import tfds_builder
from llm_jax.data.tokenizer import MODEL_NAME, Tokenizer, load_or_train_tokenizer, train_tokenizer_into

log = logging.getLogger(__name__)

_ENCODE_CHUNK = 256  # documents per SentencePiece call when counting tokens


def tokenizer_train(config: Config, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Trains the configured tokenizer on the run's documents; returns its summary.

    Default `out_dir`: WORKDIR/tokenizer, where `llm-jax train` loads it from.
    """
    out = Path(out_dir) if out_dir else Path(config.workdir) / "tokenizer"
    if (out / MODEL_NAME).exists():  # checked again when writing; here before any data work
        raise ConfigError(f"{out / MODEL_NAME} exists; a trained tokenizer is never replaced "
                          "(choose another --out or workdir)")
    sources = data_lib.open_sources(config)
    summary = train_tokenizer_into(config, sources, out)
    if out_dir:
        summary["use_with"] = f"tokenizer.path={out / MODEL_NAME}"
    return summary


def local_parts(d: DataConfig) -> list[tuple[str, DataConfig]]:
    """The local corpora (default, text, jsonl) of a data config, named by their config key."""
    if d.source == "mixture":
        parts = [(f"data.mixture.{i}", data_lib.mixture_part_config(d, e)) for i, e in enumerate(d.mixture)]
    else:
        parts = [("data", d)]
    return [(name, part) for name, part in parts if part.source != "tfds"]


def count_tokens(tokenizer: Tokenizer, split: Any, desc: str, progress: bool) -> int:
    """Tokens of every document of `split` (without bos/eos)."""
    total = 0
    # disable=None: no bar where stderr is not a terminal, so redirected logs get no redrawn lines.
    with tqdm.tqdm(total=len(split), desc=desc, unit="doc", disable=None if progress else True, dynamic_ncols=True,
                   mininterval=1.0) as bar:
        for start in range(0, len(split), _ENCODE_CHUNK):
            texts = [split[i] for i in range(start, min(start + _ENCODE_CHUNK, len(split)))]
            total += sum(len(ids) for ids in tokenizer.encode_many(texts))
            bar.update(len(texts))
    return total


def data_prepare(config: Config) -> dict[str, Any]:
    """Prepares the run's local corpora as TFDS ArrayRecord datasets and the run's tokenizer.

    Returns per corpus: where it is, documents, bytes, tokens and ArrayRecord files per split, and
    what was skipped and why. Raises ConfigError when there is nothing local to prepare.
    """
    parts = local_parts(config.data)
    if not parts:
        raise ConfigError("data prepare turns local files into a TFDS dataset; data.source=tfds datasets are "
                          "read where they are (nothing to prepare)")
    progress = config.train.progress
    sources = data_lib.open_sources(config)  # prepares what is not prepared yet
    tokenizer = load_or_train_tokenizer(config, config.workdir, sources)  # what training will use
    report: dict[str, Any] = {"tokenizer": os.fspath(tokenizer.path), "corpora": []}
    pairs = config.objective == "seq2seq"  # (input, target) examples: both sides' tokens count
    features = ("text", tfds_builder.TARGET) if pairs else ("text",)
    for name, part in parts:
        corpus = corpus_lib.find_corpus(part, pairs=pairs)  # found once already by open_sources
        prepared = tfds_builder.prepare_corpus(corpus, part.prepared_dir or None, num_shards=part.num_shards)
        splits = {}
        for split, documents in prepared.split_sizes().items():
            texts = [data_lib.TextSource(prepared.data_source(split), feature) for feature in features]
            splits[split] = {"documents": documents, "shards": prepared.split_shards()[split],
                             "tokens": sum(count_tokens(tokenizer, t, f"counting {split} tokens", progress)
                                           for t in texts)}
        tokens = sum(s["tokens"] for s in splits.values())
        report["corpora"].append({
            "name": name, "source": corpus.kind, "pattern": corpus.pattern, "files": len(corpus.files),
            "prepared": os.fspath(prepared.data_dir), "documents": prepared.documents, "bytes": prepared.bytes,
            "tokens": tokens, "skipped": prepared.skipped, "skipped_reasons": prepared.skipped_reasons,
            "splits": splits,
        })
        log.info("%s: %d documents, %.1f MB, %d tokens (%.2f bytes per token); %s", name, prepared.documents,
                 prepared.bytes / 1e6, tokens, prepared.bytes / max(tokens, 1),
                 tfds_builder.describe_skips(prepared.skipped_reasons))
    return report
