"""Tests of llm_jax.train.task_metrics: our numbers against seqeval's and scikit-learn's."""

import jax
import numpy as np
import pytest

from llm_jax.train import task_metrics as tm

seqeval_metrics = pytest.importorskip("seqeval.metrics")
sklearn_metrics = pytest.importorskip("sklearn.metrics")

TYPES = ("PER", "LOC", "ORG")
TAGS = ("O", *(f"{p}-{t}" for t in TYPES for p in "BI"))


def _random_tag_sentences(rng, n, tags=TAGS):
    """Sentences of random IOB tags, I- after O and type changes included (the non-strict cases)."""
    return [[str(rng.choice(tags)) for _ in range(rng.integers(1, 12))] for _ in range(n)]


def _noisy_copy(rng, sentences, tags=TAGS, p=0.3):
    return [[str(rng.choice(tags)) if rng.random() < p else t for t in s] for s in sentences]


@pytest.mark.parametrize("seed", range(5))
def test_entity_scores_equal_seqeval_on_random_tag_sequences(seed):
    rng = np.random.default_rng(seed)
    truth = _random_tag_sentences(rng, 60)
    guess = _noisy_copy(rng, truth)
    scores = tm.entity_counts(truth, guess).scores()
    assert scores["precision"] == pytest.approx(seqeval_metrics.precision_score(truth, guess), abs=1e-12)
    assert scores["recall"] == pytest.approx(seqeval_metrics.recall_score(truth, guess), abs=1e-12)
    assert scores["f1"] == pytest.approx(seqeval_metrics.f1_score(truth, guess), abs=1e-12)
    assert scores["token_accuracy"] == pytest.approx(seqeval_metrics.accuracy_score(truth, guess), abs=1e-12)
    assert 0 < scores["f1"] < 1  # a partial match: the comparison above says something


def test_get_entities_equals_seqeval_including_e_and_s_tags():
    from seqeval.metrics.sequence_labeling import get_entities as seqeval_entities

    rng = np.random.default_rng(7)
    tags = (*TAGS, "E-PER", "S-LOC", "E-ORG", "S-PER")
    for sentence in _random_tag_sentences(rng, 200, tags):
        assert tm.get_entities(sentence) == seqeval_entities(sentence)


def test_conlleval_semantics_on_hand_made_cases():
    # I- after O starts an entity; a type change ends one and starts another; B- after B- splits.
    assert tm.get_entities(["O", "I-PER", "I-PER", "I-LOC", "B-LOC", "B-LOC", "O"]) == [
        ("PER", 1, 2), ("LOC", 3, 3), ("LOC", 4, 4), ("LOC", 5, 5)]
    counts = tm.entity_counts([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]])
    assert counts == tm.EntityCounts(correct=0, predicted=1, true=1, correct_words=2, words=3)


def test_counts_add_over_batches_and_round_trip_as_arrays():
    rng = np.random.default_rng(3)
    truth = _random_tag_sentences(rng, 40)
    guess = _noisy_copy(rng, truth)
    whole = tm.entity_counts(truth, guess)
    halves = tm.entity_counts(truth[:15], guess[:15]) + tm.entity_counts(truth[15:], guess[15:])
    assert halves == whole
    assert tm.EntityCounts.from_array(whole.as_array() * 2) == whole + whole


def test_counts_from_padded_id_rows():
    names = ("B-LOC", "B-PER", "I-LOC", "I-PER", "O")
    truth = np.asarray([[1, 3, 4, -1], [0, 2, -1, -1]])
    guess = np.asarray([[1, 3, 0, 4], [0, 4, 2, 2]])  # predictions at padding are ignored
    counts = tm.entity_counts_from_ids(truth, guess, names)
    assert counts == tm.entity_counts([["B-PER", "I-PER", "O"], ["B-LOC", "I-LOC"]],
                                      [["B-PER", "I-PER", "B-LOC"], ["B-LOC", "O"]])
    assert (counts.correct, counts.predicted, counts.true) == (1, 3, 2)


def test_a_sentence_with_tags_of_another_length_is_an_error():
    with pytest.raises(ValueError, match="2 true tags but 1 predicted"):
        tm.entity_counts([["O", "O"]], [["O"]])


@pytest.mark.parametrize("seed", range(3))
def test_accuracy_and_macro_f1_equal_sklearn_from_a_confusion_matrix_summed_over_batches(seed):
    rng = np.random.default_rng(seed)
    classes = 6
    labels = rng.integers(0, classes - 1, 300)  # the last class never a label: only sometimes predicted
    predictions = np.where(rng.random(300) < 0.6, labels, rng.integers(0, classes, 300))
    step = jax.jit(tm.confusion_counts, static_argnums=2)
    # One more class than occurs: a class neither true nor predicted has no F1 and must not count.
    confusion = sum(np.asarray(step(labels[i:i + 64], predictions[i:i + 64], classes + 1))
                    for i in range(0, 300, 64))
    assert confusion.sum() == 300
    assert tm.accuracy(confusion) == pytest.approx(sklearn_metrics.accuracy_score(labels, predictions))
    assert tm.macro_f1(confusion) == pytest.approx(sklearn_metrics.f1_score(labels, predictions, average="macro"))


def test_confusion_ignores_unlabelled_rows_and_zero_weights():
    confusion = np.asarray(tm.confusion_counts(np.asarray([0, -1, 1, 1]), np.asarray([0, 1, 0, 1]), 2,
                                               weights=np.asarray([1.0, 1.0, 1.0, 0.0])))
    assert confusion.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert tm.accuracy(confusion) == 0.5
    # Class 0: tp 1, fp 1 -> F1 2/3; class 1: tp 0, fn 1 -> F1 0.
    assert tm.macro_f1(confusion) == pytest.approx((2 / 3 + 0) / 2)


def test_token_accuracy_counts_only_labelled_positions():
    correct, total = tm.token_accuracy_counts(np.asarray([[2, -1, 0, -1]]), np.asarray([[2, 2, 1, 0]]))
    assert (float(correct), float(total)) == (1.0, 2.0)
