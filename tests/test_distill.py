"""Distillation: the loss against a direct computation, the teacher's checks, and a student that
learns more from a teacher than alone in the same steps."""

from __future__ import annotations

import numpy as np
import pytest
from test_trainer import _config

from llm_jax.config import ConfigError
from llm_jax.train import distill
from llm_jax.train.loop import train


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_the_loss_is_the_weighted_kl_and_task_loss_of_a_direct_computation():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 2, 3, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(2, 3)).astype(np.int32)
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    batch = {"targets": targets, "weights": weights}
    source = distill.LogitsSource(logits=lambda params, batch, model, rng: params,
                                  task_loss=distill.LANGUAGE_MODEL.task_loss, weights=distill.LANGUAGE_MODEL.weights)
    t, alpha = 2.5, 0.3
    loss_sum, weight_sum = distill.distill_loss_sums(student, batch, None, None, teacher_model=None,
                                                     teacher_params=teacher, source=source, temperature=t,
                                                     alpha=alpha)
    p_t, p_s = _softmax(teacher / t), _softmax(student / t)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1)
    ce = -np.log(np.take_along_axis(_softmax(student), targets[..., None], -1)[..., 0])
    expected = alpha * t * t * (kl * weights).sum() + (1 - alpha) * (ce * weights).sum()
    assert float(weight_sum) == 3.0
    assert float(loss_sum) == pytest.approx(expected, rel=1e-5)


def test_a_classification_head_distils_over_its_labels_and_skips_unlabelled_rows():
    rng = np.random.default_rng(1)
    student, teacher = rng.normal(size=(2, 4, 3)).astype(np.float32)  # 4 rows, 3 labels
    labels = np.array([[2], [0], [-1], [1]], np.int32)  # row 2 has no label: not scored
    source = distill.LogitsSource(logits=lambda params, batch, model, rng: params,
                                  task_loss=distill.TASK.task_loss, weights=distill.TASK.weights)
    loss_sum, weight_sum = distill.distill_loss_sums(student, {"labels": labels}, None, None, teacher_model=None,
                                                     teacher_params=teacher, source=source, temperature=1.0,
                                                     alpha=0.25)
    p_t, p_s = _softmax(teacher), _softmax(student)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1)
    ce = -np.log(p_s[[0, 1, 3], labels[[0, 1, 3], 0]])
    assert float(weight_sum) == 3.0
    assert float(loss_sum) == pytest.approx(0.25 * kl[[0, 1, 3]].sum() + 0.75 * ce.sum(), rel=1e-5)


@pytest.fixture(scope="module")
def markov_corpus(tmp_path_factory):
    """Documents from a random word chain (each word followed by one of 4 words, at random rates): a
    one-hot next token is a noisy sample of the true distribution, which a trained teacher knows."""
    from test_trainer import WORDS

    root = tmp_path_factory.mktemp("markov")
    rng = np.random.default_rng(0)
    successors = [rng.choice(len(WORDS), size=4, replace=False) for _ in WORDS]
    rates = [rng.dirichlet(np.ones(4)) for _ in WORDS]
    for i in range(40):
        word, words = int(rng.integers(len(WORDS))), []
        for _ in range(120):
            words.append(WORDS[word])
            word = int(rng.choice(successors[word], p=rates[word]))
        (root / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n")
    return root


_SMALL = ["model.d_model=64", "model.n_heads=4", "model.d_ff=128", "train.eval_every=1000",
          "train.sample_tokens=1", "checkpoint.every=1000", "optimizer.warmup_steps=5", "train.eval_batches=2"]


def test_a_student_learns_more_with_its_teacher_and_a_mismatch_is_one_line(tmp_path, markov_corpus):
    teacher_dir = tmp_path / "run"
    teacher = train(_config(tmp_path, markov_corpus, "model.n_layers=4", "train.steps=200", *_SMALL))
    student = [*_SMALL, "model.n_layers=2", "train.steps=100", f"tokenizer.path={teacher_dir / 'tokenizer/spm.model'}"]
    alone = train(_config(tmp_path, markov_corpus, *student, f"workdir={tmp_path / 'alone'}"))
    taught = train(_config(tmp_path, markov_corpus, *student, f"workdir={tmp_path / 'taught'}",
                           f"distill.teacher={teacher_dir}", "distill.temperature=1", "distill.alpha=0.5"))
    print(f"held-out loss: teacher {teacher['eval_loss']:.4f}, student alone {alone['eval_loss']:.4f}, "
          f"student taught {taught['eval_loss']:.4f}")
    assert taught["eval_loss"] < alone["eval_loss"] - 0.05  # measured: 1.73 alone, 1.56 taught

    with pytest.raises(ConfigError, match="share the vocabulary") as error:
        distill.check_teacher(_config(tmp_path, markov_corpus, *student, "model.vocab_size=320",
                                      f"distill.teacher={teacher_dir}"))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="neither a run directory"):
        distill.check_teacher(_config(tmp_path, markov_corpus, *student, f"distill.teacher={tmp_path}"))
