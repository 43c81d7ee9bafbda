"""Finding and reading local documents: the embedded default corpus, text globs, jsonl globs.

A seq2seq run reads (input, target) examples instead: jsonl records with both keys
(`find_corpus(..., pairs=True)`; a `Document` then has a `target`).

A corpus is described by its kind, a root folder and a sorted file list. Everything that decides
what the prepared dataset contains (the files with their sizes and mtimes, the text key, the
eval fraction) goes into `Corpus.fingerprint()`, so a changed corpus gets a freshly prepared
dataset and an unchanged one is reused.

Each document is assigned to the train or validation split by a stable hash of its key (the file
path relative to the root, plus the line number for jsonl), not by its position in the list: adding
or removing one file does not move any other document between splits. Only a corpus too small for
the hash to give both splits a document gets one moved (see `SplitPlan`).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from llm_jax.config import ConfigError, DataConfig

# Bumped when the way documents are read or split changes, so old prepared datasets are not reused.
# 2: binary (NUL) before UTF-8 check, documents with over-long lines skipped, bytes counted.
FORMAT_VERSION = 2

# Folders of the standard library that are not the standard library: third-party installs live in
# site-packages/dist-packages and would change the corpus with every `pip install`; caches are
# not source.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})

_GLOB_MAGIC = ("*", "?", "[")


@dataclasses.dataclass(frozen=True)
class Document:
    key: str  # stable identity: relative path, or "relative/path:line" for jsonl
    text: str  # a seq2seq example's input
    target: str | None = None  # a seq2seq example's target; None: a document of text


@dataclasses.dataclass
class CorpusStats:
    """What reading the corpus found; skipped documents are counted by reason for the log."""

    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents kept
    skipped: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] += 1


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A local corpus: which files, how to read them, and how to split them."""

    kind: str  # default | text | jsonl
    root: Path  # document keys are paths relative to this folder
    files: tuple[Path, ...]  # sorted by their path relative to root
    pattern: str  # what the user asked for (for messages)
    text_key: str = "text"  # jsonl: the text's field (seq2seq: the input's)
    target_key: str = ""  # jsonl seq2seq examples: the target's field; empty: records are text
    eval_fraction: float = 0.02
    text_unit: str = "file"  # file | line: one document per text file, or per non-blank line
    max_line_bytes: int = 0  # documents with a longer line are skipped; 0: no limit

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def fingerprint(self) -> str:
        """Hash of everything that determines the prepared dataset's content.

        Sizes and mtimes stand in for file contents: hashing 34 MB on every start would cost more
        than the check is worth, and an edited file changes its mtime.
        """
        h = hashlib.sha1()
        head = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "root": str(self.root),
            "text_key": self.text_key if self.kind == "jsonl" else None,
            "eval_fraction": self.eval_fraction,
            "text_unit": self.text_unit if self.kind == "text" else None,
            "max_line_bytes": self.max_line_bytes,
        }
        if self.target_key:  # only then: the fingerprints of text corpora stay what they were
            head["target_key"] = self.target_key
        h.update(json.dumps(head, sort_keys=True).encode())
        for path in self.files:
            st = path.stat()
            h.update(f"\n{self.relative(path)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def describe(self, stats: CorpusStats) -> str:
        """One line for logs and `DataSources.description`."""
        if self.kind == "default":
            return f"default corpus: {stats.documents} files ({stats.skipped} skipped) at {self.root}"
        unit = {"jsonl": "examples" if self.target_key else "records",
                "text": "lines" if self.text_unit == "line" else "documents"}[self.kind]
        return (f"{self.kind} corpus {self.pattern}: {stats.documents} {unit} from {len(self.files)} files "
                f"({stats.skipped} skipped)")


# ----------------------------------------------------------------------------- finding files


def default_corpus_root() -> Path:
    """The running interpreter's standard library: present wherever Python is, no download."""
    return Path(sysconfig.get_path("stdlib")).resolve()


def list_default_files(root: Path) -> list[Path]:
    """All `.py` files under `root`, sorted by relative path, skipping EXCLUDED_DIRS entirely."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of site-packages (often larger than the stdlib).
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def glob_root(pattern: str) -> Path:
    """The folder before the first wildcard: keys relative to it do not depend on the cwd."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if any(m in part for m in _GLOB_MAGIC):
            break
        fixed.append(part)
    if len(fixed) == len(parts):  # no wildcard: a single file, keyed by its name
        fixed = fixed[:-1]
    return Path(*fixed).resolve() if fixed else Path.cwd().resolve()


def list_glob_files(pattern: str) -> tuple[Path, list[Path]]:
    """Files matching `pattern` (`**` recurses), sorted; ConfigError when nothing matches."""
    expanded = os.path.expanduser(pattern)
    root = glob_root(expanded)
    files = [Path(p).resolve() for p in glob.glob(expanded, recursive=True)]
    files = [p for p in files if p.is_file()]
    if not files:
        raise ConfigError(f"data.path='{pattern}' matches no files")
    outside = [p for p in files if not p.is_relative_to(root)]
    if outside:  # e.g. symlinks resolving elsewhere: key them by their absolute path instead
        root = Path("/")
    return root, sorted(set(files), key=lambda p: p.relative_to(root).as_posix())


def find_corpus(data: DataConfig, pairs: bool = False) -> Corpus:
    """The local corpus named by the data config (source default, text or jsonl).

    `pairs` (a seq2seq run): jsonl records holding an example, input data.input_key and target
    data.target_key.
    """
    if pairs:
        if data.source != "jsonl":
            raise ConfigError(f"data.source={data.source} holds text, but train.objective=seq2seq reads (input, "
                              "target) examples: use data.source=jsonl or tfds with data.input_key and data.target_key")
        if not data.path:
            raise ConfigError("data.source=jsonl needs data.path (a glob of files)")
        root, files = list_glob_files(data.path)
        return Corpus("jsonl", root, tuple(files), data.path, text_key=data.input_key, target_key=data.target_key,
                      eval_fraction=data.eval_fraction, max_line_bytes=data.max_line_bytes)
    if data.source == "default":
        root = default_corpus_root()
        files = list_default_files(root)
        if not files:
            raise ConfigError(f"data.source=default found no .py files under {root}")
        return Corpus("default", root, tuple(files), str(root), eval_fraction=data.eval_fraction,
                      max_line_bytes=data.max_line_bytes)
    if data.source in ("text", "jsonl"):
        if not data.path:
            raise ConfigError(f"data.source={data.source} needs data.path (a glob of files)")
        root, files = list_glob_files(data.path)
        return Corpus(data.source, root, tuple(files), data.path, text_key=data.text_key,
                      eval_fraction=data.eval_fraction, text_unit=data.text_unit,
                      max_line_bytes=data.max_line_bytes)
    raise ConfigError(f"data.source={data.source} is not a local corpus (default, text or jsonl)")


# ----------------------------------------------------------------------------- reading documents


def key_score(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document key: the first 8 bytes of its sha1."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def is_eval_key(key: str, eval_fraction: float) -> bool:
    """The split rule: a document is held out when its key's score is below eval_fraction."""
    return key_score(key) < eval_fraction


def has_long_line(text: str, max_line_bytes: int) -> bool:
    """Whether a line of `text` is longer than `max_line_bytes` in UTF-8 (0: no limit)."""
    if max_line_bytes <= 0 or len(text) * 4 <= max_line_bytes:  # at most 4 bytes per character
        return False
    return any(len(line) > max_line_bytes // 4 and len(line.encode("utf-8")) > max_line_bytes
               for line in text.split("\n"))


def _usable(text: str, corpus: Corpus, stats: CorpusStats, target: str | None = None) -> bool:
    """The checks every document passes, whatever its format (both sides of a seq2seq example); a
    failure is counted by reason."""
    texts = (text,) if target is None else (text, target)
    if any("\x00" in t for t in texts):  # NUL never appears in text: binary data (also inside valid UTF-8 or JSON)
        stats.skip("binary")
    elif not all(t.strip() for t in texts):
        stats.skip("empty")
    elif any(has_long_line(t, corpus.max_line_bytes) for t in texts):
        stats.skip("line too long")
    else:
        stats.documents += 1
        stats.bytes += sum(len(t.encode("utf-8")) for t in texts)
        return True
    return False


def _read_text_file(path: Path, stats: CorpusStats) -> str | None:
    """The file's text, or None (counted) when it cannot be text: unreadable, binary, not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError:
        stats.skip("unreadable")
        return None
    if b"\x00" in data:  # checked on the bytes: most binary files are not valid UTF-8 either
        stats.skip("binary")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("not utf-8")
        return None


def _iter_text_file(corpus: Corpus, path: Path, stats: CorpusStats) -> Iterator[Document]:
    text = _read_text_file(path, stats)
    if text is None:
        return
    rel = corpus.relative(path)
    if corpus.text_unit == "file":
        if _usable(text, corpus, stats):
            yield Document(rel, text)
        return
    if not text.strip():
        stats.skip("empty")
        return
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip() and _usable(line, corpus, stats):  # blank lines separate documents
            yield Document(f"{rel}:{lineno}", line)


def _iter_jsonl_file(corpus: Corpus, path: Path, stats: CorpusStats) -> Iterator[Document]:
    rel = corpus.relative(path)
    try:
        handle = path.open("rb")
    except OSError:
        stats.skip("unreadable")
        return
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                stats.skip("malformed json")
                continue
            keys = (corpus.text_key, corpus.target_key) if corpus.target_key else (corpus.text_key,)
            values = [record.get(key) if isinstance(record, dict) else None for key in keys]
            missing = [key for key, value in zip(keys, values) if not isinstance(value, str)]
            if missing:
                stats.skip(f"no string '{missing[0]}'")
                continue
            text, target = values[0], (values[1] if corpus.target_key else None)
            if _usable(text, corpus, stats, target):
                yield Document(f"{rel}:{lineno}", text, target)


def iter_documents(corpus: Corpus, stats: CorpusStats | None = None,
                   on_file: Callable[[], None] | None = None) -> Iterator[Document]:
    """Every usable document of the corpus in file order; skips are counted in `stats`.

    `on_file` is called after each file (a progress bar's update).
    """
    stats = CorpusStats() if stats is None else stats
    read = _iter_jsonl_file if corpus.kind == "jsonl" else _iter_text_file
    for path in corpus.files:
        yield from read(corpus, path, stats)
        if on_file is not None:
            on_file()


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """The split of every document, decided by one reading pass before anything is written.

    The rule is `is_eval_key`. A small corpus can leave a split empty (20 files at 2% usually give
    no validation file), which TFDS refuses to write and which would leave the run without eval.
    So, with at least two documents, an empty validation split takes the train document of lowest
    score, and an empty train split takes the validation document of highest score. A corpus of a
    single document has no validation split.
    """

    eval_fraction: float
    train: int  # documents per split, after the moves
    validation: int
    stats: CorpusStats
    to_eval: str | None = None  # the key moved into validation, if any
    to_train: str | None = None

    def split_of(self, key: str) -> str:
        if key == self.to_eval:
            return "validation"
        if key == self.to_train:
            return "train"
        return "validation" if is_eval_key(key, self.eval_fraction) else "train"


def plan_splits(corpus: Corpus, on_file: Callable[[], None] | None = None) -> SplitPlan:
    """Reads the corpus once to count documents per split (and skips), applying SplitPlan's rule."""
    stats = CorpusStats()
    n_eval = 0
    lowest_train: tuple[float, str | None] = (2.0, None)
    highest_eval: tuple[float, str | None] = (-1.0, None)
    for doc in iter_documents(corpus, stats, on_file):
        score = key_score(doc.key)
        if score < corpus.eval_fraction:
            n_eval += 1
            highest_eval = max(highest_eval, (score, doc.key))
        else:
            lowest_train = min(lowest_train, (score, doc.key))
    n_train = stats.documents - n_eval
    if n_eval == 0 and n_train >= 2:
        return SplitPlan(corpus.eval_fraction, n_train - 1, 1, stats, to_eval=lowest_train[1])
    if n_train == 0 and n_eval >= 1:
        return SplitPlan(corpus.eval_fraction, 1, n_eval - 1, stats, to_train=highest_eval[1])
    return SplitPlan(corpus.eval_fraction, n_train, n_eval, stats)


def iter_split(corpus: Corpus, split: str, plan: SplitPlan) -> Iterator[Document]:
    """The documents of one split ("train" or "validation") under `plan`."""
    for doc in iter_documents(corpus):
        if plan.split_of(doc.key) == split:
            yield doc
