"""Labelled examples for fine-tuning: reading them, splitting them, and their label set.

Two tasks (`task.kind`):
- classify: an example is a text, optionally a second one (sentence pairs), and one label.
  Sources: CSV/TSV (`data.source=csv`: a header row names the columns data.text_key,
  data.text_pair_key and data.label_key; a `.tsv` file is tab-separated without quoting, as GLUE's
  are, any other file's delimiter is sniffed), JSONL (the same keys as fields) and TFDS (the same
  keys as features, e.g. `glue/sst2` with data.text_key=sentence).
- tag: an example is a sentence of words with one tag each. Sources: CoNLL (`data.source=conll`: one
  word per line, the word in the first column and its tag in the last, so CoNLL-2003's four-column
  files work; a blank line between sentences; `-DOCSTART-` lines skipped), JSONL (lists in
  data.tokens_key and data.tags_key) and TFDS (the same keys as features, e.g. `conll2003` with
  data.tags_key=ner).

Labels are names (str). Integers (JSON numbers, TFDS integer features) become their decimal text; a
TFDS ClassLabel becomes its name (GLUE's -1, "no label", becomes a missing label). Tags are IOB: "O",
"B-TYPE" or "I-TYPE"; IOB1 (CoNLL-2003's original files, where an entity starts with I- unless it
follows one of its type) is rewritten to IOB2 (every entity starts with B-) as it is read, which keeps
every entity as seqeval reads it and gives the first word of every entity the same tag.

The label set (`LabelSet`) is read from the training split: classify, the labels seen, sorted (by
value when all are integers); tag, "O" and both B- and I- of every entity type seen, sorted. The run
keeps it as `labels.json` (`save_labels`, `load_labels`) so ids mean the same thing at predict time.

Splits: data.eval_path names the held-out files (the same format as data.path); empty, a stable-hash
share data.eval_fraction of data.path's examples is held out, as for pretraining
(`corpus.is_eval_key` on the key `file:line` (jsonl, csv: the row's last line) or `file:N` (the
N-th sentence of a CoNLL file)); TFDS reads data.tfds_train_split and data.tfds_eval_split.

Skipped and counted by reason (as bad pretraining input, `corpus.CorpusStats`): a row without a label
or text, a malformed row, a tag sequence whose length differs from its words, a tag that is not IOB,
and a held-out example whose label (or tag) the training split never has. Nothing usable left in a
split that was asked for is a ConfigError (one line). Fine-tuning sets are small (thousands to a few
hundred thousand examples): they are read into memory once, as lists of examples.

Their tokens: data/task_inputs.py.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from llm_jax.config import Config, ConfigError, DataConfig
from llm_jax.data import corpus as corpus_lib
from llm_jax.data.pipeline import _tfds_error  # the same one-line errors as pretraining's TFDS sources
from llm_jax.data.tfds_builder import describe_skips

log = logging.getLogger(__name__)

LABELS_FILE = "labels.json"


@dataclasses.dataclass(frozen=True)
class ClassifyExample:
    key: str  # stable identity: "file:line" (local) or "split:index" (TFDS)
    text: str
    pair: str | None  # the second text of a sentence pair; None: one text
    label: str  # the label's name


@dataclasses.dataclass(frozen=True)
class TagExample:
    key: str  # "file:line" (jsonl), "file:N" (the N-th sentence of a CoNLL file) or "split:index" (TFDS)
    words: tuple[str, ...]
    tags: tuple[str, ...]  # IOB2, one per word


Example = ClassifyExample | TagExample


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """The labels of a run, in id order: label id i is names[i]."""

    task: str  # classify | tag
    names: tuple[str, ...]
    _ids: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", {name: i for i, name in enumerate(self.names)})

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._ids

    def id(self, name: str) -> int:
        return self._ids[name]


@dataclasses.dataclass(frozen=True)
class LabelledSources:
    """The labelled examples of each split (in memory: `__len__`, `__getitem__`), like
    pipeline.DataSources for documents, with the label set read from the training split."""

    task: str  # classify | tag
    train: list[Example]
    eval: list[Example]
    labels: LabelSet
    description: str
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> examples skipped

    def texts(self, split: str = "train") -> TextView:
        """The split's examples as text documents (the tokenizer's sample reads them)."""
        return TextView(self.train if split == "train" else self.eval)


class TextView:
    """Examples seen as text: a classification example's text (and pair), a sentence's words joined."""

    def __init__(self, examples: Sequence[Example]):
        self._examples = examples

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> str:
        example = self._examples[int(index)]
        if isinstance(example, TagExample):
            return " ".join(example.words)
        return example.text if example.pair is None else f"{example.text}\n{example.pair}"


# ----------------------------------------------------------------------------- labels and tags


_INTEGER = re.compile(r"-?\d+")


def label_name(value: Any) -> str | None:
    """A label value as read -> its name; None when there is none (missing, empty, a float that is
    not an integer, a list...)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def to_iob2(tags: Sequence[str]) -> tuple[str, ...] | None:
    """IOB1 or IOB2 tags -> IOB2 (an I-X that does not continue an X entity becomes B-X); None when a
    tag is not O, B-TYPE or I-TYPE."""
    out = []
    prev = "O"
    for tag in tags:
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            return None
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return tuple(out)


def build_label_set(task: str, train: Sequence[Example]) -> LabelSet:
    """The label set of the training split (see the module docstring for the order)."""
    if task == "tag":
        types = {tag[2:] for example in train for tag in example.tags if tag != "O"}
        return LabelSet(task, tuple(sorted({"O", *(f"{p}-{t}" for t in types for p in "BI")})))
    names = {example.label for example in train}
    if all(_INTEGER.fullmatch(name) for name in names):
        return LabelSet(task, tuple(sorted(names, key=int)))
    return LabelSet(task, tuple(sorted(names)))


def save_labels(labels: LabelSet, path: str | os.PathLike) -> None:
    """Writes `labels.json` ({"task": ..., "labels": [...]}) through a temporary file and a rename, so
    a crash never leaves half a label set for a resumed run or predict to read."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"task": labels.task, "labels": list(labels.names)}, indent=1) + "\n")
    os.replace(tmp, path)


def load_labels(path: str | os.PathLike) -> LabelSet:
    """The label set saved by `save_labels`; ConfigError (one line) when it is missing or damaged."""
    try:
        data = json.loads(Path(path).read_text())
        labels = LabelSet(str(data["task"]), tuple(str(name) for name in data["labels"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"the label set {path} cannot be read ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if not labels.names or len(set(labels.names)) != len(labels.names):
        raise ConfigError(f"the label set {path} must list distinct labels")
    return labels


def _usable(task: str, example: Example, stats: corpus_lib.CorpusStats) -> Example | None:
    """The checks every example passes, whatever its source; tags come back as IOB2."""
    if isinstance(example, ClassifyExample):
        if not example.text.strip() or (example.pair is not None and not example.pair.strip()):
            stats.skip("empty text")
            return None
        stats.documents += 1
        return example
    if not example.words:
        stats.skip("empty sentence")
        return None
    if len(example.words) != len(example.tags):
        stats.skip("tags and tokens differ in length")
        return None
    if not all(example.words):
        stats.skip("empty word")
        return None
    tags = to_iob2(example.tags)
    if tags is None:
        stats.skip("tag not IOB")
        return None
    stats.documents += 1
    return dataclasses.replace(example, tags=tags)


# ----------------------------------------------------------------------------- local files


def _read_text(path: Path, stats: corpus_lib.CorpusStats) -> str | None:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError:
        stats.skip("unreadable file")
    except UnicodeDecodeError:
        stats.skip("file not utf-8")
    return None


def _csv_reader(text: str, path: Path) -> Any:
    """A csv.reader for the file: tabs without quoting for .tsv, else the sniffed dialect (commas by default)."""
    if path.suffix.lower() == ".tsv":
        return csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        dialect: Any = csv.Sniffer().sniff(text[:65536], delimiters=",\t;|")
    except csv.Error:
        dialect = csv.excel
    return csv.reader(io.StringIO(text, newline=""), dialect)


def _read_csv(path: Path, rel: str, d: DataConfig, stats: corpus_lib.CorpusStats) -> Iterator[ClassifyExample]:
    text = _read_text(path, stats)
    if text is None:
        return
    reader = _csv_reader(text, path)
    header = [name.strip() for name in next(reader, [])]
    keys = [("data.text_key", d.text_key), ("data.label_key", d.label_key)]
    if d.text_pair_key:
        keys.append(("data.text_pair_key", d.text_pair_key))
    for config_key, column in keys:
        if column not in header:
            raise ConfigError(f"{config_key}: {rel} has no column '{column}' in its header row "
                              f"(it has: {', '.join(header) or 'nothing'})")
    at = {name: header.index(name) for _, name in keys}
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            stats.skip("malformed row")
            continue
        if not any(field.strip() for field in row):
            continue  # blank lines are not rows
        if len(row) != len(header):
            stats.skip("wrong number of fields")
            continue
        label = label_name(row[at[d.label_key]])
        if label is None:
            stats.skip("no label")
            continue
        pair = row[at[d.text_pair_key]] if d.text_pair_key else None
        yield ClassifyExample(f"{rel}:{reader.line_num}", row[at[d.text_key]], pair, label)


def _classify_record(record: dict, key: str, d: DataConfig, stats: corpus_lib.CorpusStats) -> ClassifyExample | None:
    names = (d.text_key, d.text_pair_key) if d.text_pair_key else (d.text_key,)
    texts = [record.get(name) for name in names]
    missing = [name for name, value in zip(names, texts) if not isinstance(value, str)]
    if missing:
        stats.skip(f"no string '{missing[0]}'")
        return None
    label = label_name(record.get(d.label_key))
    if label is None:
        stats.skip("no label")
        return None
    return ClassifyExample(key, texts[0], texts[1] if d.text_pair_key else None, label)


def _tag_record(record: dict, key: str, d: DataConfig, stats: corpus_lib.CorpusStats) -> TagExample | None:
    words, tags = record.get(d.tokens_key), record.get(d.tags_key)
    for name, value in ((d.tokens_key, words), (d.tags_key, tags)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            stats.skip(f"no list of strings '{name}'")
            return None
    return TagExample(key, tuple(words), tuple(tags))


def _read_jsonl(path: Path, rel: str, task: str, d: DataConfig, stats: corpus_lib.CorpusStats) -> Iterator[Example]:
    text = _read_text(path, stats)
    if text is None:
        return
    make = _tag_record if task == "tag" else _classify_record
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            stats.skip("malformed json")
            continue
        if not isinstance(record, dict):
            stats.skip("malformed json")
            continue
        example = make(record, f"{rel}:{lineno}", d, stats)
        if example is not None:
            yield example


def _read_conll(path: Path, rel: str, stats: corpus_lib.CorpusStats) -> Iterator[TagExample]:
    text = _read_text(path, stats)
    if text is None:
        return
    words: list[str] = []
    tags: list[str] = []
    malformed = False
    count = 0
    for line in [*text.split("\n"), ""]:  # the final "" closes the last sentence
        parts = line.split()
        if parts and parts[0] != "-DOCSTART-":
            if len(parts) < 2:
                malformed = True
            else:
                words.append(parts[0])
                tags.append(parts[-1])
            continue
        if words or malformed:  # a blank or -DOCSTART- line ends the sentence
            count += 1
            if malformed:
                stats.skip("line without a tag")
            else:
                yield TagExample(f"{rel}:{count}", tuple(words), tuple(tags))
        words, tags, malformed = [], [], False


def _read_files(pattern: str, task: str, d: DataConfig, stats: corpus_lib.CorpusStats) -> list[Example]:
    root, files = corpus_lib.list_glob_files(pattern)
    examples = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        if d.source == "csv":
            found: Iterator[Example] = _read_csv(path, rel, d, stats)
        elif d.source == "conll":
            found = _read_conll(path, rel, stats)
        else:
            found = _read_jsonl(path, rel, task, d, stats)
        examples += [e for e in (_usable(task, example, stats) for example in found) if e is not None]
    return examples


def split_by_key(examples: list[Example], eval_fraction: float) -> tuple[list[Example], list[Example]]:
    """The hash split of the pretraining corpus (`corpus.is_eval_key`). As there (`corpus.SplitPlan`),
    with at least two examples neither split stays empty: an empty one takes the other's example
    nearest the cut."""
    train = [e for e in examples if not corpus_lib.is_eval_key(e.key, eval_fraction)]
    held = [e for e in examples if corpus_lib.is_eval_key(e.key, eval_fraction)]
    if len(examples) >= 2 and not held:
        lowest = min(train, key=lambda e: corpus_lib.key_score(e.key))
        train, held = [e for e in train if e is not lowest], [lowest]
    elif len(examples) >= 2 and not train:
        highest = max(held, key=lambda e: corpus_lib.key_score(e.key))
        train, held = [highest], [e for e in held if e is not highest]
    return train, held


# ----------------------------------------------------------------------------- TFDS


def _as_text(value: Any) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _class_names(feature: Any) -> list[str] | None:
    """The names of a ClassLabel feature (or of a Sequence of them); None for other features."""
    inner = getattr(feature, "feature", feature)
    names = getattr(inner, "names", None)
    return list(names) if names else None


def _tfds_examples(source: Any, split: str, task: str, d: DataConfig, stats: corpus_lib.CorpusStats) -> list[Example]:
    features = getattr(getattr(source, "dataset_info", None), "features", None)
    if features is None:  # a source without its info (e.g. a list in tests): the builder's
        features = tfds.builder(d.tfds_name, data_dir=d.tfds_data_dir or None).info.features
    keys = (("data.tokens_key", d.tokens_key), ("data.tags_key", d.tags_key)) if task == "tag" else (
        ("data.text_key", d.text_key), ("data.label_key", d.label_key),
        *((("data.text_pair_key", d.text_pair_key),) if d.text_pair_key else ()))
    for config_key, feature in keys:
        if feature not in features:
            raise ConfigError(f"{config_key}: dataset '{d.tfds_name}' has no feature '{feature}' "
                              f"(it has: {', '.join(sorted(features.keys()))})")
    label_feature = d.tags_key if task == "tag" else d.label_key
    names = _class_names(features[label_feature])

    def name_of(value: Any) -> str | None:
        if names is not None:  # a ClassLabel: its id, -1 for "no label" (GLUE's test splits)
            index = int(value)
            return names[index] if 0 <= index < len(names) else None
        return label_name(value)

    examples = []
    for index in range(len(source)):
        record, key = source[index], f"{split}:{index}"
        if task == "tag":
            tags = [name_of(v) for v in np.asarray(record[d.tags_key]).reshape(-1)]
            if None in tags:
                stats.skip("no label")
                continue
            words = tuple(_as_text(w) for w in np.asarray(record[d.tokens_key]).reshape(-1))
            example: Example = TagExample(key, words, tuple(tags))
        else:
            label = name_of(record[d.label_key])
            if label is None:
                stats.skip("no label")
                continue
            pair = _as_text(record[d.text_pair_key]) if d.text_pair_key else None
            example = ClassifyExample(key, _as_text(record[d.text_key]), pair, label)
        usable = _usable(task, example, stats)
        if usable is not None:
            examples.append(usable)
    return examples


def _open_tfds_split(d: DataConfig, split: str, config_key: str) -> Any:
    try:
        # TFDS registers its older text datasets (glue, conll2003, ...) only when their module is imported.
        import tensorflow_datasets.text  # noqa: F401
    except Exception:  # a TFDS build without them: the lookup below names the dataset
        pass
    try:
        return tfds.data_source(d.tfds_name, split=split, data_dir=d.tfds_data_dir or None, download=False)
    except (tfds.core.registered.DatasetNotFoundError, ValueError, KeyError, AssertionError,
            NotImplementedError, FileNotFoundError) as e:
        raise _tfds_error(d, split, config_key, e) from None


# ----------------------------------------------------------------------------- opening


def _keep_known(examples: list[Example], labels: LabelSet, stats: corpus_lib.CorpusStats,
                reason: str = "label unseen in training") -> list[Example]:
    """The examples whose labels (tags) are all in `labels`; the others are skipped and counted."""
    kept = []
    for example in examples:
        names = example.tags if isinstance(example, TagExample) else (example.label,)
        if all(name in labels for name in names):
            kept.append(example)
        else:
            stats.documents -= 1
            stats.skip(reason)
    return kept


def open_labelled(config: Config, labels: LabelSet | None = None) -> LabelledSources:
    """The labelled examples of a classify or tag run, split, with their label set. Raises ConfigError.

    `labels`: the run's saved label set (a resumed run, eval, predict), used instead of the training
    split's so that ids keep their meaning; training examples outside it are skipped and counted too.
    """
    d, task = config.data, config.task.kind
    if task not in ("classify", "tag"):
        raise ConfigError(f"task.kind={task} does not read labelled examples (classify or tag do)")
    if labels is not None and labels.task != task:
        raise ConfigError(f"task.kind={task}, but the run's label set is for task {labels.task}")
    train_stats, eval_stats = corpus_lib.CorpusStats(), corpus_lib.CorpusStats()
    if d.source == "tfds":
        train = _tfds_examples(_open_tfds_split(d, d.tfds_train_split, "data.tfds_train_split"),
                               d.tfds_train_split, task, d, train_stats)
        held = _tfds_examples(_open_tfds_split(d, d.tfds_eval_split, "data.tfds_eval_split"),
                              d.tfds_eval_split, task, d, eval_stats)
        where, held_where = f"tfds {d.tfds_name} ({d.tfds_train_split})", f"({d.tfds_eval_split})"
    elif d.eval_path:
        train = _read_files(d.path, task, d, train_stats)
        held = _read_files(d.eval_path, task, d, eval_stats)
        where, held_where = f"{d.source} {d.path}", f"({d.eval_path})"
    else:
        examples = _read_files(d.path, task, d, train_stats)
        train, held = split_by_key(examples, d.eval_fraction)
        train_stats.documents, eval_stats.documents = len(train), len(held)
        where, held_where = f"{d.source} {d.path}", f"({d.eval_fraction:.0%} held out by key)"
    if labels is not None:
        train = _keep_known(train, labels, train_stats, "label not in the run's label set")
    if not train:
        raise ConfigError(f"no usable {task} examples in {where}: {describe_skips(train_stats.reasons)}")
    labels = build_label_set(task, train) if labels is None else labels
    held = _keep_known(held, labels, eval_stats)
    if not held and (d.source == "tfds" or d.eval_path):
        raise ConfigError(f"no usable held-out {task} examples {held_where}: {describe_skips(eval_stats.reasons)}")
    if not held:
        log.warning("the eval split is empty (%d usable examples in all); evaluation is skipped", len(train))
    skipped = dict(train_stats.reasons + eval_stats.reasons)
    description = (f"{task} examples from {where}: {len(train)} train, {len(held)} eval {held_where}, "
                   f"{len(labels)} labels; {describe_skips(skipped)}")
    log.info("data: %s", description)
    return LabelledSources(task, train, held, labels, description, skipped)
