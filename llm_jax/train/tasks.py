"""Fine-tuning runs (task.kind classify | tag) in the one trainer: what loop.py does differently for them.

The loop, checkpoints, resume, signals, sharding and pmap are the pretraining ones; a task run differs in
- its data: labelled examples in memory (data/labelled.py), one per row (data/task_batches.py);
- its label set, read from the training split on the first start and kept in WORKDIR/labels.json, which
  every later start (resume, eval, predict, export) reads instead, so label ids keep their meaning;
- its model: models/heads.TaskModel, the pretraining body under "body" and a new head;
- `init_from`: the export's parameters restore the body alone; the head starts fresh;
- its loss (train/task_steps.py) and its eval: the whole held-out split (not train.eval_batches of it:
  a metric on a part would depend on the batch size), reported as design.md names them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import Config, ConfigError
from llm_jax.data import labelled
from llm_jax.data import task_batches as batches_lib
from llm_jax.data.task_inputs import count_truncated
from llm_jax.data.tokenizer import Tokenizer, load_or_train_tokenizer
from llm_jax.models.heads import TaskModel
from llm_jax.parallel import mesh as mesh_lib
from llm_jax.train import checkpoint as ckpt
from llm_jax.train import task_metrics

log = logging.getLogger(__name__)


def is_task(config: Config) -> bool:
    return config.task.kind != "lm"


def labels_path(workdir: str | Path) -> Path:
    return Path(workdir) / labelled.LABELS_FILE


def saved_labels(workdir: str | Path) -> labelled.LabelSet | None:
    """The run's label set (labels.json), or None before its first start."""
    path = labels_path(workdir)
    return labelled.load_labels(path) if path.is_file() else None


def required_labels(workdir: str | Path) -> labelled.LabelSet:
    labels = saved_labels(workdir)
    if labels is None:
        raise ConfigError(f"workdir: {labels_path(workdir)} is missing: the run's label set, written on its first "
                          "start, is needed to build its head")
    return labels


class _TextSources:
    """The examples as text documents, for the tokenizer trainer (`sources.train`)."""

    def __init__(self, sources: labelled.LabelledSources):
        self.train, self.eval = sources.texts("train"), sources.texts("eval")


def open_task_data(config: Config, workdir: Path) -> tuple[labelled.LabelledSources, Tokenizer]:
    """The labelled examples (with the saved label set when the run has one) and the run's tokenizer."""
    sources = labelled.open_labelled(config, saved_labels(workdir))
    tokenizer = load_or_train_tokenizer(config, workdir, _TextSources(sources))
    encoder = batches_lib.make_encoder(config, tokenizer, sources.labels)  # refuses a tokenizer without [CLS]/[SEP]
    cut = count_truncated(encoder, sources.train)
    if cut:  # said once: a classifier reads less of them, a tagger gets no label for their last words
        log.warning("%d of %d training examples do not fit train.seq_len=%d and are cut", cut, len(sources.train),
                    config.train.seq_len)
    return sources, tokenizer


def save_run_labels(config: Config, labels: labelled.LabelSet) -> None:
    """Writes labels.json on the first start (process 0); a resumed run keeps the file it read."""
    path = labels_path(config.workdir)
    if jax.process_index() == 0 and not path.is_file():
        labelled.save_labels(labels, path)


def make_task_model(config: Config, labels: labelled.LabelSet) -> TaskModel:
    if config.model.family.encoder_decoder:
        raise ConfigError(f"task.kind={config.task.kind} reads an encoder or a decoder; model.arch={config.model.arch} "
                          "is an encoder-decoder")
    return TaskModel(config.model, config.task.kind, len(labels), config.pooling)


def make_train_iterator(config: Config, tokenizer: Any, sources: labelled.LabelledSources,
                        rows) -> batches_lib.TaskIterator:
    return batches_lib.TaskIterator(config, tokenizer, sources, rows)


def held_out_batches(setup) -> list[dict[str, np.ndarray]]:
    """The whole held-out split in fixed batches, cut to this process's rows (device arrays only)."""
    c = setup.config
    encode = batches_lib.make_encoder(c, setup.tokenizer, setup.sources.labels)
    rows = mesh_lib.batch_rows(setup.mesh, c.train.batch_size)
    return [batches_lib.device_part(b) for b in batches_lib.fixed_batches(
        setup.sources.eval, encode, c.task.kind, c.train.batch_size, c.train.seq_len, rows)]


def scores(kind: str, sums: dict[str, Any], names) -> dict[str, float]:
    """The eval line of a task from its summed counts (design.md's names)."""
    weight = max(float(sums["weight"]), 1.0)
    loss = float(sums["loss"]) / weight
    result = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
    if kind == "classify":
        result["eval_accuracy"] = task_metrics.accuracy(sums["confusion"])
        result["eval_macro_f1"] = task_metrics.macro_f1(sums["confusion"])
    else:
        s = sums["entities"].scores()
        result.update(eval_precision=s["precision"], eval_recall=s["recall"], eval_f1=s["f1"],
                      eval_accuracy=s["token_accuracy"])
    return result


def evaluate_task(setup, eval_fn, params, eval_batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Sums loss and counts over the held-out batches (classify: a confusion matrix on the device;
    tag: entity counts on the host, from the replicated per-piece predictions), then one division."""
    c = setup.config
    batch_sharding = mesh_lib.batch_sharding(setup.mesh)
    sums: dict[str, Any] = {"loss": jnp.zeros(()), "weight": jnp.zeros(())}
    entities = task_metrics.EntityCounts()
    with setup.context():
        for local in eval_batches:
            out = eval_fn(params, mesh_lib.global_batch(local, batch_sharding, c.train.batch_size))
            sums["loss"] = sums["loss"] + out["loss"]
            sums["weight"] = sums["weight"] + out["weight"]
            if "confusion" in out:
                sums["confusion"] = sums.get("confusion", 0) + out["confusion"]
            else:
                host = jax.device_get({"labels": out["labels"], "predictions": out["predictions"]})
                entities = entities + task_metrics.entity_counts_from_ids(host["labels"], host["predictions"],
                                                                          setup.sources.labels.names)
    sums = jax.device_get(sums)
    if c.task.kind == "classify" and "confusion" not in sums:
        sums["confusion"] = np.zeros((len(setup.sources.labels),) * 2)
    sums["entities"] = entities
    return scores(c.task.kind, sums, setup.sources.labels.names)


def params_from_export(config: Config, params: Any, abstract_params: Any) -> Any:
    """A fresh task model's params with the body replaced by `init_from`'s exported parameters."""
    body = ckpt.load_exported_params(config.init_from, config.model, abstract_params["body"])
    return {**params, "body": body}
