"""Fine-tuning example datasets that need no download: real labelled text from this machine's Python
standard library (like the default pretraining corpus, `corpus.default_corpus_root()`).

- Classification (`write_classify_example`): the body of each function defined at the top level of a
  module, or of a class at its top level, labelled with the standard-library package it comes from
  (`CLASSIFY_PACKAGES`: ten packages with a few hundred functions each, e.g. email, asyncio, xml). At
  most max_examples // 10 per package are kept, so the classes are nearly balanced; the summary gives
  the majority-class baseline of the validation split, the accuracy a model must beat. Written as
  JSONL records {"text", "label", "key"} (`task.kind=classify data.source=jsonl`).
- Tagging (`write_tag_example`): lines of Python source cut into words by Python's own `tokenize`,
  each word tagged in IOB2 with the category of its token: KEYWORD (`keyword.kwlist`), BUILTIN (a
  name of the `builtins` module), NAME (any other name), STRING, NUMBER, COMMENT; operators and
  punctuation are O. A token with spaces inside (a comment, many strings) becomes several words, B-
  then I- of its category, so entities span words as names do in CoNLL-2003. Written as CoNLL
  (`task.kind=tag data.source=conll`).

Both are split into train and validation by a stable hash of each example's key (file:function,
file:line; `corpus.is_eval_key` with VALIDATION_FRACTION) and written as `train.*` and
`validation.*` with a `summary.json`. Tests of the standard library (folders named test, tests,
idle_test) are left out: they hold deliberately broken files and would dominate the counts. The
content follows the running Python's standard library, so two Python versions give somewhat
different datasets; one interpreter always gives the same.
"""

from __future__ import annotations

import ast
import builtins
import collections
import io
import json
import keyword
import textwrap
import tokenize
from collections.abc import Iterator
from pathlib import Path

from llm_jax.data import corpus as corpus_lib

CLASSIFY_PACKAGES = ("asyncio", "concurrent", "email", "http", "importlib", "logging", "multiprocessing",
                     "unittest", "urllib", "xml")
VALIDATION_FRACTION = 0.2
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
MIN_BODY_CHARS = 40  # shorter bodies ("pass", "return self._x") say nothing of their package
MAX_BODY_CHARS = 2000  # more than a fine-tuning sequence holds; whole lines are kept
MAX_SENTENCE_WORDS = 48  # longer lines (a long docstring's words) would not fit a short sequence
SENTENCES_PER_FILE = 40  # spreads the tagging example over many files
# `site` adds these to builtins in some interpreters only (not under python -S): not BUILTIN, so the
# dataset does not depend on how Python was started.
_SITE_NAMES = frozenset({"copyright", "credits", "exit", "help", "license", "quit"})
BUILTIN_NAMES = frozenset(n for n in dir(builtins) if not n.startswith("_") and n not in _SITE_NAMES)
TAG_TYPES = ("KEYWORD", "BUILTIN", "NAME", "STRING", "NUMBER", "COMMENT")


def _stdlib_files(root: Path, under: Path) -> list[Path]:
    """The .py files under `under` (sorted), without site-packages, caches and test folders."""
    if not under.is_dir():
        return []
    return [p for p in corpus_lib.list_default_files(under)
            if not TEST_DIRS.intersection(p.relative_to(root).parts[:-1])]


def _split_of(key: str) -> str:
    return "validation" if corpus_lib.is_eval_key(key, VALIDATION_FRACTION) else "train"


def _write_summary(out_dir: Path, summary: dict) -> dict:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# ----------------------------------------------------------------------------- classification


def _read_source(path: Path) -> str | None:
    try:
        with tokenize.open(path) as handle:  # honours the file's coding declaration
            return handle.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def function_bodies(source: str) -> Iterator[tuple[str, str]]:
    """(qualified name, body text) of each function at the top level of `source` or of a class there.

    The body is its whole lines, dedented: no signature, no decorators. Bodies on the def line
    (`def f(): pass`) are left out.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    found = [(node.name, node) for node in tree.body if isinstance(node, functions)]
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        found += [(f"{cls.name}.{node.name}", node) for node in cls.body if isinstance(node, functions)]
    for name, node in found:
        first, last = node.body[0], node.body[-1]
        if first.lineno == node.lineno:
            continue
        body = textwrap.dedent("\n".join(lines[first.lineno - 1:last.end_lineno]))
        yield name, body


def _cut(text: str, max_chars: int) -> str:
    """At most max_chars of text, whole lines (at least the first)."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    return head[:head.rfind("\n")] if "\n" in head else head


def write_classify_example(out_dir: str | Path, max_examples: int = 2000, packages: tuple[str, ...] = CLASSIFY_PACKAGES,
                           root: str | Path | None = None) -> dict:
    """Writes the package-classification example into out_dir (train.jsonl, validation.jsonl,
    summary.json) and returns the summary: example counts per split and label, and the majority-class
    baseline accuracy of the validation split. `root`: the standard library (a test gives another)."""
    root = corpus_lib.default_corpus_root() if root is None else Path(root)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_package = max(1, max_examples // len(packages))
    chosen = []
    for package in packages:
        bodies = []
        for path in _stdlib_files(root, root / package):
            source = _read_source(path)
            rel = path.relative_to(root).as_posix()
            for name, body in function_bodies(source or ""):
                if len(body) >= MIN_BODY_CHARS:
                    bodies.append((f"{rel}:{name}", _cut(body, MAX_BODY_CHARS)))
        # A stable sample of the package, drawn by a hash of another kind than the split's, so that
        # the sample does not decide the split.
        bodies.sort(key=lambda item: corpus_lib.key_score("sample:" + item[0]))
        chosen += [(key, package, body) for key, body in bodies[:per_package]]
    chosen.sort()
    counts: dict[str, collections.Counter] = {"train": collections.Counter(), "validation": collections.Counter()}
    handles = {split: (out_dir / f"{split}.jsonl").open("w", encoding="utf-8") for split in counts}
    with handles["train"], handles["validation"]:
        for key, package, body in chosen:
            split = _split_of(key)
            handles[split].write(json.dumps({"text": body, "label": package, "key": key}) + "\n")
            counts[split][package] += 1
    held = counts["validation"]
    summary = {
        "task": "classify",
        "train": sum(counts["train"].values()),
        "validation": sum(held.values()),
        "labels": {package: counts["train"][package] + held[package] for package in packages},
        "majority_baseline": max(held.values()) / sum(held.values()) if held else 0.0,
    }
    return _write_summary(out_dir, summary)


# ----------------------------------------------------------------------------- tagging


_STRING_STARTS = tuple(getattr(tokenize, n) for n in ("FSTRING_START", "TSTRING_START") if hasattr(tokenize, n))
_STRING_ENDS = tuple(getattr(tokenize, n) for n in ("FSTRING_END", "TSTRING_END") if hasattr(tokenize, n))
_LINE_ENDS = (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)
_NOT_WORDS = (tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)


def token_category(token: tokenize.TokenInfo) -> str | None:
    """The entity type of a token (TAG_TYPES), or None for O (operators, punctuation)."""
    if token.type == tokenize.NAME:
        if keyword.iskeyword(token.string):
            return "KEYWORD"
        return "BUILTIN" if token.string in BUILTIN_NAMES else "NAME"
    return {tokenize.STRING: "STRING", tokenize.NUMBER: "NUMBER", tokenize.COMMENT: "COMMENT"}.get(token.type)


def _text_between(lines: list[str], start: tuple[int, int], end: tuple[int, int]) -> str:
    """The source from tokenize position `start` to `end` (rows 1-based, columns 0-based)."""
    (r0, c0), (r1, c1) = start, end
    if r0 == r1:
        return lines[r0 - 1][c0:c1]
    return lines[r0 - 1][c0:] + "".join(lines[r0:r1 - 1]) + lines[r1 - 1][:c1]


def _merged_tokens(source: str) -> Iterator[tokenize.TokenInfo]:
    """tokenize's tokens, with an f-string (and a t-string) as one STRING token, as Python 3.11 gives
    it: from 3.12 tokenize yields its parts, which would make the dataset depend on the version."""
    lines = source.splitlines(keepends=True)
    depth, start = 0, None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in _STRING_STARTS:
            depth += 1
            start = token.start if depth == 1 else start
        elif token.type in _STRING_ENDS:
            depth -= 1
            if depth == 0:
                text = _text_between(lines, start, token.end)
                yield tokenize.TokenInfo(tokenize.STRING, text, start, token.end, token.line)
        elif depth == 0:
            yield token


def tagged_lines(source: str) -> list[tuple[int, list[str], list[str]]]:
    """(line number, words, IOB2 tags) of each source line that holds an entity; [] when the source
    does not tokenize."""
    sentences = []
    words: list[str] = []
    tags: list[str] = []
    line = 0
    try:
        for token in _merged_tokens(source):
            if token.type in _LINE_ENDS:
                if any(tag != "O" for tag in tags):
                    sentences.append((line, words, tags))
                words, tags = [], []
                continue
            parts = token.string.split()
            if token.type in _NOT_WORDS or not parts:
                continue
            if not words:
                line = token.start[0]
            category = token_category(token)
            words += parts
            tags += ["O"] * len(parts) if category is None else [f"B-{category}"] + [f"I-{category}"] * (len(parts) - 1)
    except (tokenize.TokenError, SyntaxError):
        return []
    return sentences


def write_tag_example(out_dir: str | Path, max_sentences: int = 3000, root: str | Path | None = None) -> dict:
    """Writes the token-category tagging example into out_dir (train.conll, validation.conll,
    summary.json) and returns the summary: sentence counts per split and word counts per tag.

    Files are visited in a stable pseudo-random order (by a hash of their path), up to
    SENTENCES_PER_FILE lines from each (again by hash), lines of at most MAX_SENTENCE_WORDS words; a
    line already taken (the same words and tags) is not taken again, so no line is both trained on
    and held out.
    """
    root = corpus_lib.default_corpus_root() if root is None else Path(root)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(_stdlib_files(root, root), key=lambda p: corpus_lib.key_score(p.relative_to(root).as_posix()))
    seen: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
    chosen = []
    for path in files:
        if len(chosen) >= max_sentences:
            break
        rel = path.relative_to(root).as_posix()
        lines = [(f"{rel}:{n}", words, tags) for n, words, tags in tagged_lines(_read_source(path) or "")
                 if len(words) <= MAX_SENTENCE_WORDS]
        lines.sort(key=lambda item: corpus_lib.key_score("sample:" + item[0]))
        taken = 0
        for key, words, tags in lines:
            if taken == SENTENCES_PER_FILE or len(chosen) == max_sentences:
                break
            if (tuple(words), tuple(tags)) not in seen:
                seen.add((tuple(words), tuple(tags)))
                chosen.append((key, words, tags))
                taken += 1
    counts = {"train": 0, "validation": 0}
    tag_counts: collections.Counter = collections.Counter()
    handles = {split: (out_dir / f"{split}.conll").open("w", encoding="utf-8") for split in counts}
    with handles["train"], handles["validation"]:
        for key, words, tags in sorted(chosen):
            split = _split_of(key)
            handles[split].write("".join(f"{w} {t}\n" for w, t in zip(words, tags)) + "\n")
            counts[split] += 1
            tag_counts.update(tags)
    summary = {"task": "tag", **counts, "tags": dict(sorted(tag_counts.items()))}
    return _write_summary(out_dir, summary)
