"""Pure loss and eval functions of fine-tuning tasks (classify, tag); the trainer jits them (loop.py).

Losses are (sum, weight) as the language model's: softmax cross entropy over the labels, summed over
the rows (classify) or first pieces of words (tag) whose label is >= 0, and their count. `train_step`
(steps.py) takes `task_loss_sums` as its loss_fn, so accumulation, pmap, the non-finite guard and
the optimizer are the pretraining ones.

Eval returns counts that add up over batches and hosts (task_metrics.py): classify a confusion
matrix; tag the per-piece predictions and labels (replicated: the host turns them into entity counts,
which seqeval's convention computes on tag sequences, not on the device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llm_jax.train.task_metrics import confusion_counts


def task_logits(params, batch: dict[str, jax.Array], model, rng: jax.Array | None) -> jax.Array:
    """[B, C] (classify) or [B, L, C] (tag) float32 logits of a TaskModel (models/heads.py)."""
    deterministic = rng is None
    return model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"], token_types=batch["token_types"],
                       deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})


def _labels(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """The labels shaped as the logits' leading axes: classify [B, 1] -> [B]; tag [B, L]."""
    labels = batch["labels"]
    return labels[:, 0] if logits.ndim == 2 else labels


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    weights = (labels >= 0).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(labels, 0))
    return jnp.sum(losses * weights), jnp.sum(weights)


def task_loss_sums(params, batch: dict[str, jax.Array], model, rng: jax.Array | None):
    """(summed cross entropy, number of labelled rows or words): steps.train_step's loss_fn."""
    logits = task_logits(params, batch, model, rng)
    return _cross_entropy(logits, _labels(logits, batch))


def task_eval_step(params, batch: dict[str, jax.Array], *, model, num_labels: int) -> dict[str, jax.Array]:
    """classify: {"loss", "weight", "confusion" [C, C]}; tag: {"loss", "weight", "predictions" [B, L],
    "labels" [B, L]} (the caller sums the former over batches, and counts entities from the latter)."""
    logits = task_logits(params, batch, model, None)
    labels = _labels(logits, batch)
    loss_sum, weight_sum = _cross_entropy(logits, labels)
    predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = {"loss": loss_sum, "weight": weight_sum}
    if logits.ndim == 2:
        out["confusion"] = confusion_counts(labels, predictions, num_labels)
    else:
        out["predictions"], out["labels"] = predictions, labels
    return out


def task_probabilities(params, batch: dict[str, jax.Array], *, model) -> jax.Array:
    """Softmax over the labels (predict): [B, C] or [B, L, C], float32."""
    return jax.nn.softmax(task_logits(params, batch, model, None), axis=-1)
