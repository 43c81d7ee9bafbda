"""Finding and reading local documents: the embedded default corpus, text globs, jsonl globs.

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
from collections.abc import Iterator
from pathlib import Path

from llm_jax.config import ConfigError, DataConfig

# Bumped when the way documents are read or split changes, so old prepared datasets are not reused.
FORMAT_VERSION = 1

# Folders of the standard library that are not the standard library: third-party installs live in
# site-packages/dist-packages and would change the corpus with every `pip install`; caches are
# not source.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})

_GLOB_MAGIC = ("*", "?", "[")


@dataclasses.dataclass(frozen=True)
class Document:
    key: str  # stable identity: relative path, or "relative/path:line" for jsonl
    text: str


@dataclasses.dataclass
class CorpusStats:
    """What reading the corpus found; skipped documents are counted by reason for the log."""

    documents: int = 0
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
    text_key: str = "text"
    eval_fraction: float = 0.02

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
        }
        h.update(json.dumps(head, sort_keys=True).encode())
        for path in self.files:
            st = path.stat()
            h.update(f"\n{self.relative(path)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def describe(self, stats: CorpusStats) -> str:
        """One line for logs and `DataSources.description`."""
        if self.kind == "default":
            return f"default corpus: {stats.documents} files ({stats.skipped} skipped) at {self.root}"
        unit = "records" if self.kind == "jsonl" else "documents"
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


def find_corpus(data: DataConfig) -> Corpus:
    """The local corpus named by the data config (source default, text or jsonl)."""
    if data.source == "default":
        root = default_corpus_root()
        files = list_default_files(root)
        if not files:
            raise ConfigError(f"data.source=default found no .py files under {root}")
        return Corpus("default", root, tuple(files), str(root), eval_fraction=data.eval_fraction)
    if data.source in ("text", "jsonl"):
        if not data.path:
            raise ConfigError(f"data.source={data.source} needs data.path (a glob of files)")
        root, files = list_glob_files(data.path)
        return Corpus(data.source, root, tuple(files), data.path, text_key=data.text_key,
                      eval_fraction=data.eval_fraction)
    raise ConfigError(f"data.source={data.source} is not a local corpus (default, text or jsonl)")


# ----------------------------------------------------------------------------- reading documents


def key_score(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document key: the first 8 bytes of its sha1."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def is_eval_key(key: str, eval_fraction: float) -> bool:
    """The split rule: a document is held out when its key's score is below eval_fraction."""
    return key_score(key) < eval_fraction


def _read_text_file(path: Path, stats: CorpusStats) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        stats.skip("unreadable")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("not utf-8")
        return None
    if "\x00" in text:  # valid UTF-8 but binary (NUL bytes never appear in text)
        stats.skip("binary")
        return None
    if not text.strip():
        stats.skip("empty")
        return None
    return text


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
            text = record.get(corpus.text_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                stats.skip(f"no string '{corpus.text_key}'")
                continue
            if not text.strip():
                stats.skip("empty")
                continue
            stats.documents += 1
            yield Document(f"{rel}:{lineno}", text)


def iter_documents(corpus: Corpus, stats: CorpusStats | None = None) -> Iterator[Document]:
    """Every usable document of the corpus in file order; skips are counted in `stats`."""
    stats = CorpusStats() if stats is None else stats
    for path in corpus.files:
        if corpus.kind == "jsonl":
            yield from _iter_jsonl_file(corpus, path, stats)
            continue
        text = _read_text_file(path, stats)
        if text is not None:
            stats.documents += 1
            yield Document(corpus.relative(path), text)


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


def plan_splits(corpus: Corpus) -> SplitPlan:
    """Reads the corpus once to count documents per split (and skips), applying SplitPlan's rule."""
    stats = CorpusStats()
    n_eval = 0
    lowest_train: tuple[float, str | None] = (2.0, None)
    highest_eval: tuple[float, str | None] = (-1.0, None)
    for doc in iter_documents(corpus, stats):
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
