"""`llm-jax predict WORKDIR --input FILE [--output FILE]`: a fine-tuned run's predictions, one JSON line per example.

The input is in the run's format (data.source: jsonl, csv or conll; a tfds run reads JSONL with its
keys), labels optional: classify reads data.text_key (and data.text_pair_key), tag reads the words
(data.tokens_key of JSONL, the first column of CoNLL). Each example is encoded as in training (the same
tokenizer, seq_len and label set, labels.json) and read by the newest checkpoint:
- classify: {"label": the most probable label, "probability": its probability};
- tag: {"tokens": the words, "tags": one tag per word}, a word's tag being the prediction at its first
  piece, as training labels it; a word cut off by train.seq_len has no piece and is tagged "O".
Every example of the file is written, in order (a row without text is written as null).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llm_jax.config import Config, ConfigError
from llm_jax.data import labelled
from llm_jax.data import task_batches as batches_lib
from llm_jax.parallel import mesh as mesh_lib
from llm_jax.train import loop
from llm_jax.train.task_steps import task_probabilities


def _records(config: Config, path: Path) -> list[dict[str, Any] | list[str]]:
    """The file's examples as JSON-like records (jsonl, csv) or word lists (conll)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--input: {path} cannot be read ({type(e).__name__})") from None
    source = config.data.source
    if source == "conll":
        sentences, words = [], []
        for line in [*text.split("\n"), ""]:
            parts = line.split()
            if parts and parts[0] != "-DOCSTART-":
                words.append(parts[0])
            elif words:
                sentences.append(words)
                words = []
        return sentences
    if source == "csv":
        reader = labelled._csv_reader(text, path)
        header = [name.strip() for name in next(reader, [])]
        return [dict(zip(header, row)) for row in reader if any(field.strip() for field in row)]
    records = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"--input: {path}:{lineno} is not JSON (the run reads JSONL)") from None
    return records


def _examples(config: Config, records: list, labels: labelled.LabelSet) -> list[labelled.Example | None]:
    """Records -> examples with placeholder labels (the encoders need one; predictions ignore it)."""
    d = config.data
    out: list[labelled.Example | None] = []
    for i, record in enumerate(records):
        if config.task.kind == "tag":
            words = record if isinstance(record, list) else (
                record.get(d.tokens_key) if isinstance(record, dict) else None)
            ok = isinstance(words, list) and words and all(isinstance(w, str) and w for w in words)
            out.append(labelled.TagExample(str(i), tuple(words), ("O",) * len(words)) if ok else None)
            continue
        text = record.get(d.text_key) if isinstance(record, dict) else None
        pair = record.get(d.text_pair_key) if isinstance(record, dict) and d.text_pair_key else None
        ok = isinstance(text, str) and text.strip() and (not d.text_pair_key or isinstance(pair, str))
        out.append(labelled.ClassifyExample(str(i), text, pair, labels.names[0]) if ok else None)
    return out


def _decode(kind: str, example, probs: np.ndarray, row: dict[str, np.ndarray], names) -> dict[str, Any]:
    if kind == "classify":
        best = int(np.argmax(probs))
        return {"label": names[best], "probability": float(probs[best])}
    tags = ["O"] * len(example.words)
    for j in np.flatnonzero(row["labels"] >= 0):  # a word's first piece
        tags[int(row["word_index"][j])] = names[int(np.argmax(probs[j]))]
    return {"tokens": list(example.words), "tags": tags}


def predict(workdir: str | Path, input_path: str | Path) -> list[dict[str, Any] | None]:
    """The predictions of the run's newest checkpoint for every example of `input_path`, in order."""
    setup, params, _ = loop.restore_for_inference(workdir)
    c = setup.config
    if setup.labels is None:
        raise ConfigError(f"{workdir} is a language-model run (task.kind=lm): predict reads classify or tag runs")
    examples = _examples(c, _records(c, Path(input_path)), setup.labels)
    usable = [e for e in examples if e is not None]
    encode = batches_lib.make_encoder(c, setup.tokenizer, setup.labels)
    batch_sharding = mesh_lib.batch_sharding(setup.mesh)
    probabilities = jax.jit(functools.partial(task_probabilities, model=setup.model),
                            in_shardings=(setup.state_shardings.params, batch_sharding),
                            out_shardings=mesh_lib.replicated(setup.mesh))
    rows = mesh_lib.batch_rows(setup.mesh, c.train.batch_size)
    results = []
    with setup.context():
        for start, batch in zip(range(0, len(usable), c.train.batch_size),
                                batches_lib.fixed_batches(usable, encode, c.task.kind, c.train.batch_size,
                                                          c.train.seq_len, rows)):
            device = mesh_lib.global_batch(batches_lib.device_part(batch), batch_sharding, c.train.batch_size)
            probs = np.asarray(jax.device_get(probabilities(params, device)))
            for i, example in enumerate(usable[start:start + c.train.batch_size]):
                results.append(_decode(c.task.kind, example, probs[i], {k: v[i] for k, v in batch.items()},
                                       setup.labels.names))
    found = iter(results)
    return [None if e is None else next(found) for e in examples]


def write_predictions(workdir: str | Path, input_path: str | Path, output: str | Path | None) -> int:
    """Writes one JSON line per example to `output` (None: stdout); returns how many."""
    lines = [json.dumps(p) for p in predict(workdir, input_path)]
    text = "".join(line + "\n" for line in lines)
    if output is None:
        sys.stdout.write(text)
    else:
        Path(output).write_text(text)
    return len(lines)
