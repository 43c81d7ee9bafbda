"""Token inputs of labelled examples (data/labelled.py): classification inputs per model kind, and
word labels moved onto the pieces of tagged sentences.

A classification example becomes `[CLS] text [SEP] (pair [SEP])` for an encoder and
`[bos] text [eos] (pair [eos])` for a decoder (its last real token, the final eos, has seen every
other); the longer text is cut first to fit train.seq_len. A tagged sentence is tokenized word by word
(`align_word_labels`), so a piece never straddles two words: the first word as it is, every later word
after one space, which is how SentencePiece (without a dummy prefix, as this project trains it) cuts
the words of running text, so the pieces are those of the sentence written out. The first piece of
each word carries the word's label and the other pieces -1 (ignored by the loss and the metrics); each
piece also knows its word's index, so per-piece predictions turn back into per-word tags (a word cut
off by train.seq_len gets no prediction).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from llm_jax.config import ConfigError
from llm_jax.data.labelled import ClassifyExample, LabelSet, TagExample

IGNORE = -1  # the label of pieces that are not the first of a word, and of special tokens


def _truncate_pair(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Cuts the longer of the two texts first (one token at a time) until both fit `budget`."""
    if b is None:
        return a[:max(budget, 0)], None
    la, lb = len(a), len(b)
    while la + lb > budget and la + lb > 0:
        if la >= lb:
            la -= 1
        else:
            lb -= 1
    return a[:la], b[:lb]


def encoder_classify_inputs(tokenizer: Any, text: str, pair: str | None, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] text [SEP] (pair [SEP])` cut to seq_len, and the token types (0 for the first segment,
    1 for the pair's), as BERT's."""
    specials = 3 if pair is not None else 2
    a, b = _truncate_pair(tokenizer.encode(text), None if pair is None else tokenizer.encode(pair), seq_len - specials)
    ids = [tokenizer.cls_id, *a, tokenizer.sep_id]
    types = [0] * len(ids)
    if b is not None:
        ids += [*b, tokenizer.sep_id]
        types += [1] * (len(b) + 1)
    return np.asarray(ids, np.int32), np.asarray(types, np.int32)


def decoder_classify_inputs(tokenizer: Any, text: str, pair: str | None, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`[bos] text [eos] (pair [eos])` cut to seq_len, and the token types (0, then 1 for the pair's).
    The last token is always an eos that has seen the whole example: where `last` pooling reads."""
    specials = 3 if pair is not None else 2
    a, b = _truncate_pair(tokenizer.encode(text), None if pair is None else tokenizer.encode(pair), seq_len - specials)
    ids = [tokenizer.bos_id, *a, tokenizer.eos_id]
    types = [0] * len(ids)
    if b is not None:
        ids += [*b, tokenizer.eos_id]
        types += [1] * (len(b) + 1)
    return np.asarray(ids, np.int32), np.asarray(types, np.int32)


@dataclasses.dataclass(frozen=True)
class AlignedWords:
    """A sentence's pieces with the word labels moved onto them (`align_word_labels`)."""

    ids: np.ndarray  # int32 [pieces]
    labels: np.ndarray  # int32 [pieces]: a word's label on its first piece, IGNORE (-1) on the others
    word_index: np.ndarray  # int32 [pieces]: the index of the word each piece belongs to
    words_kept: int  # words whose first piece fits in max_len (the others get no label, no prediction)
    truncated: bool  # whether pieces were cut off at max_len


def align_word_labels(tokenizer: Any, words: Sequence[str], label_ids: Sequence[int], max_len: int) -> AlignedWords:
    """Tokenizes `words` one by one (the first as it is, the others after a space: the pieces of the
    sentence written out) and gives each word's first piece its label, the other pieces IGNORE.
    Cut at `max_len` pieces."""
    ids: list[int] = []
    labels: list[int] = []
    word_index: list[int] = []
    for i, (word, label) in enumerate(zip(words, label_ids, strict=True)):
        pieces = tokenizer.encode(word if i == 0 else " " + word)
        if not pieces:  # nothing to carry the label (an empty word, which the readers skip)
            continue
        ids += pieces
        labels += [int(label)] + [IGNORE] * (len(pieces) - 1)
        word_index += [i] * len(pieces)
    truncated = len(ids) > max_len
    ids, labels, word_index = ids[:max_len], labels[:max_len], word_index[:max_len]
    words_kept = sum(label != IGNORE for label in labels)  # one first piece per word
    return AlignedWords(np.asarray(ids, np.int32), np.asarray(labels, np.int32), np.asarray(word_index, np.int32),
                        words_kept, truncated)


class ClassifyEncoder:
    """A ClassifyExample -> {"inputs", "token_types": int32 [n <= seq_len], "label": int32 []}, for an
    encoder (`encoder_classify_inputs`) or a decoder (`decoder_classify_inputs`). Picklable."""

    def __init__(self, tokenizer: Any, labels: LabelSet, seq_len: int, encoder: bool):
        if encoder and None in (tokenizer.cls_id, tokenizer.sep_id):
            raise ConfigError(f"task.kind=classify on an encoder needs a tokenizer with [CLS] and [SEP]; "
                              f"{tokenizer!r} lacks them")
        if seq_len < 4:
            raise ConfigError(f"train.seq_len={seq_len} is too short to classify: the special tokens take 2, "
                              "3 with a text pair")
        self.tokenizer, self.labels, self.seq_len = tokenizer, labels, seq_len
        self.encode = encoder_classify_inputs if encoder else decoder_classify_inputs

    def __call__(self, example: ClassifyExample) -> dict[str, np.ndarray]:
        ids, types = self.encode(self.tokenizer, example.text, example.pair, self.seq_len)
        return {"inputs": ids, "token_types": types, "label": np.asarray(self.labels.id(example.label), np.int32)}

    def truncated(self, example: ClassifyExample) -> bool:
        """Whether the example's tokens do not all fit seq_len (its texts are cut)."""
        texts = (example.text,) if example.pair is None else (example.text, example.pair)
        return sum(len(self.tokenizer.encode(t)) + 1 for t in texts) + 1 > self.seq_len


class TagEncoder:
    """A TagExample -> {"inputs", "labels", "word_index": int32 [n <= seq_len]}: `[CLS] pieces [SEP]`
    for an encoder, `[bos] pieces` for a decoder, the specials labelled IGNORE with word index -1.
    Picklable."""

    def __init__(self, tokenizer: Any, labels: LabelSet, seq_len: int, encoder: bool):
        if encoder and None in (tokenizer.cls_id, tokenizer.sep_id):
            raise ConfigError(f"task.kind=tag on an encoder needs a tokenizer with [CLS] and [SEP]; "
                              f"{tokenizer!r} lacks them")
        self.tokenizer, self.labels, self.seq_len, self.encoder = tokenizer, labels, seq_len, encoder

    def _specials(self) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        return ([tok.cls_id], [tok.sep_id]) if self.encoder else ([tok.bos_id], [])

    def align(self, example: TagExample) -> AlignedWords:
        head, tail = self._specials()
        return align_word_labels(self.tokenizer, example.words, [self.labels.id(t) for t in example.tags],
                                 self.seq_len - len(head) - len(tail))

    def truncated(self, example: TagExample) -> bool:
        """Whether the sentence's pieces do not all fit seq_len (its last words lose their labels)."""
        return self.align(example).truncated

    def __call__(self, example: TagExample) -> dict[str, np.ndarray]:
        head, tail = self._specials()
        aligned = self.align(example)
        none = [IGNORE] * len(head), [IGNORE] * len(tail)
        return {"inputs": np.asarray([*head, *aligned.ids, *tail], np.int32),
                "labels": np.asarray([*none[0], *aligned.labels, *none[1]], np.int32),
                "word_index": np.asarray([*none[0], *aligned.word_index, *none[1]], np.int32)}


def count_truncated(encoder: ClassifyEncoder | TagEncoder, examples: Sequence[ClassifyExample | TagExample]) -> int:
    """How many examples lose tokens to train.seq_len, for the run log (one tokenizing pass)."""
    return sum(encoder.truncated(example) for example in examples)
