"""Metrics of fine-tuning tasks: classification (accuracy, macro F1) and tagging (entity-level
precision, recall and F1 on IOB2 tags; token accuracy).

Every metric is kept as counts that add up over batches and hosts, and is normalised only at the
end (as the losses are: sums and weights, never means of means):
- classification: a confusion matrix [C, C] (rows the true label, columns the prediction), built
  inside a jitted step by `confusion_counts` and summed;
- tagging: `EntityCounts` (correct, predicted, true entities; correct and total words), counted on
  the host from per-word tag sequences by `entity_counts`, summed (`+`), and across hosts as one
  small array (`EntityCounts.as_array` / `from_array`).

Entities follow `seqeval`'s default mode, the conlleval convention (not its `mode="strict"`): an
I- tag after O, or after a tag of another type, starts an entity; an entity ends where the next
tag is O, a B-, or of another type. `get_entities` is a port of seqeval's, E-/S- tags included, so
our numbers are seqeval's (tests/test_task_metrics.py checks it on random sequences); seqeval is a
test dependency only. Precision, recall and F1 are micro averages over all entity types, with 0
where a denominator is 0 (seqeval's zero_division default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- classification


def confusion_counts(labels: jnp.ndarray, predictions: jnp.ndarray, num_classes: int,
                     weights: jnp.ndarray | None = None) -> jnp.ndarray:
    """[num_classes, num_classes] float32 counts: row = true label, column = predicted label.

    Jittable. Labels < 0 (padding rows, unlabelled examples) count nothing, nor do rows of weight 0.
    """
    labels = jnp.asarray(labels).reshape(-1)
    predictions = jnp.asarray(predictions).reshape(-1)
    keep = (labels >= 0).astype(jnp.float32)
    if weights is not None:
        keep = keep * jnp.asarray(weights, jnp.float32).reshape(-1)
    counts = jnp.zeros((num_classes, num_classes), jnp.float32)
    return counts.at[jnp.clip(labels, 0, num_classes - 1), jnp.clip(predictions, 0, num_classes - 1)].add(keep)


def accuracy(confusion: np.ndarray) -> float:
    """Share of examples whose prediction is their label; 0 without examples."""
    confusion = np.asarray(confusion, np.float64)
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total > 0 else 0.0


def macro_f1(confusion: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 = 2tp / (2tp + fp + fn).

    Over the classes that occur as a label or a prediction (as scikit-learn's
    `f1_score(average="macro")` without `labels=`): a class absent from both has no F1, and
    counting it as 0 or 1 would move the mean with the size of the label set.
    """
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    if not present.any():
        return 0.0
    return float(np.mean(2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])))


# ----------------------------------------------------------------------------- tagging


def token_accuracy_counts(labels: jnp.ndarray, predictions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(correct, total) over the positions with a label >= 0 (first pieces of words). Jittable."""
    keep = jnp.asarray(labels) >= 0
    correct = jnp.sum(jnp.where(keep, jnp.asarray(predictions) == jnp.asarray(labels), False))
    return correct.astype(jnp.float32), jnp.sum(keep).astype(jnp.float32)


def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '_'), as seqeval (prefix style)."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities of one tag sequence as (type, first, last) word indices (inclusive).

    seqeval's `get_entities` (default, non-strict mode) for one sentence.
    """
    entities = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag, type_ = _split_tag(chunk)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            entities.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return entities


@dataclasses.dataclass(frozen=True)
class EntityCounts:
    """What entity-level and token-level tagging metrics are computed from; adds up with `+`."""

    correct: int = 0  # predicted entities that are true entities (type and span)
    predicted: int = 0
    true: int = 0
    correct_words: int = 0  # words whose predicted tag is their tag
    words: int = 0

    def __add__(self, other: EntityCounts) -> EntityCounts:
        return EntityCounts(*(a + b for a, b in zip(self.as_array(), other.as_array())))

    def as_array(self) -> np.ndarray:
        """The counts as one int64 array, e.g. to sum over hosts."""
        return np.asarray([self.correct, self.predicted, self.true, self.correct_words, self.words], np.int64)

    @classmethod
    def from_array(cls, counts: np.ndarray) -> EntityCounts:
        return cls(*(int(c) for c in np.asarray(counts).reshape(-1)))

    def scores(self) -> dict[str, float]:
        """precision, recall, f1 (entity level, micro) and token_accuracy; 0 where undefined."""
        precision = self.correct / self.predicted if self.predicted else 0.0
        recall = self.correct / self.true if self.true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        token_accuracy = self.correct_words / self.words if self.words else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "token_accuracy": token_accuracy}


def entity_counts(true_tags: Sequence[Sequence[str]], predicted_tags: Sequence[Sequence[str]]) -> EntityCounts:
    """Counts over sentences of per-word tags; a sentence's two sequences must be equally long."""
    correct = predicted = true = correct_words = words = 0
    for truth, guess in zip(true_tags, predicted_tags, strict=True):
        if len(truth) != len(guess):
            raise ValueError(f"a sentence has {len(truth)} true tags but {len(guess)} predicted ones")
        true_set, guess_set = set(get_entities(truth)), set(get_entities(guess))
        correct += len(true_set & guess_set)
        predicted += len(guess_set)
        true += len(true_set)
        correct_words += sum(t == g for t, g in zip(truth, guess))
        words += len(truth)
    return EntityCounts(correct, predicted, true, correct_words, words)


def entity_counts_from_ids(true_ids: np.ndarray, predicted_ids: np.ndarray, names: Sequence[str]) -> EntityCounts:
    """`entity_counts` of rows of per-word tag ids ([sentences, words]; -1 marks no word: padding).

    `names[i]` is the tag of id i (the run's label set). The words of a row are its ids >= 0.
    """
    true_ids, predicted_ids = np.asarray(true_ids), np.asarray(predicted_ids)
    truths, guesses = [], []
    for truth_row, guess_row in zip(true_ids, predicted_ids):
        keep = truth_row >= 0
        truths.append([names[i] for i in truth_row[keep]])
        guesses.append([names[i] for i in guess_row[keep]])
    return entity_counts(truths, guesses)
