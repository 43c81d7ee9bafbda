"""Fine-tuning through the one trainer: classify and tag runs from an exported bert learn and report their
metrics, init_from restores the body exactly, a resumed run matches the uninterrupted one, predict writes
what eval scores, a decoder classifies too, and a model that does not fit the export is refused."""

import json
import random
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from llm_jax import cli
from llm_jax.config import load_config
from llm_jax.train import checkpoint as ckpt
from llm_jax.train import loop, task_metrics, tasks
from llm_jax.train.loop import train
from llm_jax.train.metrics import read_metrics

ROOT = Path(__file__).parent.parent
ANIMALS = "cat dog bird horse cow sheep goat duck mouse fish".split()
TOOLS = "hammer saw drill wrench knife spoon lamp chair table door".split()
FILLER = "the a my your this that one old new big small red".split()
PEOPLE, PLACES = ["Alice", "Bob", "Carol", "Dave"], ["Paris", "Rome", "Oslo", "Lima"]

TINY = ("model.arch=bert", "model.vocab_size=300", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
        "model.d_ff=64", "model.max_len=32", "tokenizer.sample_bytes=100000", "train.progress=false",
        "train.seq_len=16", "train.batch_size=8", "train.log_every=1", "optimizer.warmup_steps=2",
        "optimizer.lr=3e-3")


def _sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(FILLER) + " " + rng.choice(words) for _ in range(2))


def _tagged(rng: random.Random) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for _ in range(4):
        kind = rng.random()
        if kind < 0.3:
            words.append(rng.choice(PEOPLE))
            tags.append("B-PER")
        elif kind < 0.5:
            words += ["in", rng.choice(PLACES)]
            tags += ["O", "B-LOC"]
        else:
            words.append(rng.choice(FILLER + ANIMALS))
            tags.append("O")
    return words, tags


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Classify (animal vs tool sentences) and tag (names and places) files, and a text corpus of both."""
    root = tmp_path_factory.mktemp("ftdata")
    rng = random.Random(0)
    for split, n in (("train", 96), ("validation", 24)):
        rows = [{"text": _sentence(rng, ANIMALS if i % 2 else TOOLS), "label": "animal" if i % 2 else "tool"}
                for i in range(n)]
        (root / f"classify_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        sentences = [_tagged(rng) for _ in range(n)]
        (root / f"tag_{split}.conll").write_text(
            "\n".join("".join(f"{w} {t}\n" for w, t in zip(*s)) for s in sentences))
    (root / "corpus").mkdir()
    for i in range(8):
        words = [rng.choice(ANIMALS + TOOLS + FILLER + PEOPLE + PLACES + ["in"]) for _ in range(200)]
        (root / "corpus" / f"doc{i}.txt").write_text(" ".join(words) + "\n")
    return root


@pytest.fixture(scope="module")
def export(data, tmp_path_factory):
    """An `llm-jax export` directory of a bert (its tokenizer trained on the corpus): what fine-tuning
    starts from. Written by the export's own writer from freshly initialised parameters, as no test here
    needs them pretrained (tests/test_bert.py exports a trained run)."""
    root = tmp_path_factory.mktemp("pretrain")
    config = load_config(None, [f"workdir={root / 'run'}", "data.source=text", f"data.path={data}/corpus/*.txt",
                                f"data.prepared_dir={root / 'prepared'}", *TINY, "seed=7"])
    setup = loop.build(config)
    state = loop.create_state(setup)
    return ckpt.export_params(root / "export", state.params, config, root / "run" / "tokenizer", {"step": 0})


def _classify(workdir: Path, data: Path, export: Path, *extra: str):
    return load_config(None, [f"workdir={workdir}", "task.kind=classify", "data.source=jsonl",
                              f"data.path={data}/classify_train.jsonl",
                              f"data.eval_path={data}/classify_validation.jsonl", f"init_from={export}", *TINY,
                              "task.pooling=mean", "optimizer.lr=1e-2", "train.steps=32", "train.eval_every=16",
                              "checkpoint.every=16", *extra])


def _tag(workdir: Path, data: Path, export: Path, *extra: str):
    return load_config(None, [f"workdir={workdir}", "task.kind=tag", "data.source=conll",
                              f"data.path={data}/tag_train.conll", f"data.eval_path={data}/tag_validation.conll",
                              f"init_from={export}", *TINY, "train.seq_len=32", "optimizer.lr=1e-2", "train.steps=30",
                              "train.eval_every=15", "checkpoint.every=15", *extra])


@pytest.fixture(scope="module")
def classify_run(data, export, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("classify") / "run"
    return workdir, train(_classify(workdir, data, export))


def test_a_classify_run_from_an_export_learns_and_reports_accuracy_and_macro_f1(classify_run):
    workdir, summary = classify_run
    rows = read_metrics(workdir / "metrics.jsonl")
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [16, 32]
    assert {"eval_accuracy", "eval_macro_f1", "eval_loss", "eval_perplexity"} <= set(evals[-1])
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < 0.69  # ln 2: chance
    assert evals[-1]["eval_accuracy"] >= 0.8  # two balanced classes: chance is 0.5
    assert evals[-1]["eval_macro_f1"] >= 0.8
    assert summary["eval_accuracy"] == evals[-1]["eval_accuracy"] and summary["sample"] is None
    assert json.loads((workdir / "labels.json").read_text())["labels"] == ["animal", "tool"]


def test_a_tag_run_learns_and_reports_entity_scores(data, export, tmp_path):
    summary = train(_tag(tmp_path / "run", data, export))
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    for key in ("eval_precision", "eval_recall", "eval_f1", "eval_accuracy"):
        assert 0.0 <= evals[-1][key] <= 1.0 and summary[key] == evals[-1][key]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_f1"] > 0.3  # tagging every word O scores 0
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["B-LOC", "B-PER", "I-LOC",
                                                                                     "I-PER", "O"]
    # predict tags each word from its first piece, as eval scores it
    out = tmp_path / "tags.jsonl"
    assert cli.main(["predict", str(tmp_path / "run"), "--input", str(data / "tag_validation.conll"),
                     "--output", str(out)]) == 0
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    truth = [s.split("\n") for s in (data / "tag_validation.conll").read_text().strip().split("\n\n")]
    truth_tags = [[line.split()[1] for line in s] for s in truth]
    assert [p["tokens"] for p in predicted] == [[line.split()[0] for line in s] for s in truth]
    counts = task_metrics.entity_counts(truth_tags, [p["tags"] for p in predicted]).scores()
    assert counts["f1"] == pytest.approx(summary["eval_f1"], abs=1e-9)
    assert counts["token_accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-9)


def test_init_from_restores_the_body_bit_exactly_and_creates_the_head(data, export, tmp_path):
    config = _classify(tmp_path / "run", data, export)
    setup = loop.build(config)
    fresh = loop.create_state(setup)
    params = tasks.params_from_export(config, fresh.params, setup.abstract_state.params)
    with ocp.StandardCheckpointer() as checkpointer:
        exported = checkpointer.restore(export / "params")
    assert jax.tree.structure(params["body"]) == jax.tree.structure(exported)
    for got, want in zip(jax.tree.leaves(params["body"]), jax.tree.leaves(exported)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.dtype == want.dtype
    initial = jax.tree.leaves(fresh.params["body"])
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(exported), initial))  # not the init
    head = nn.unbox(params["head"])
    assert head["kernel"].shape == (32, 2) and head["bias"].shape == (2,)
    np.testing.assert_array_equal(np.asarray(head["kernel"]), np.asarray(fresh.params["head"]["kernel"]))


def test_a_resumed_fine_tuning_run_matches_the_uninterrupted_one(classify_run, data, export, tmp_path):
    workdir, _ = classify_run
    resumed = tmp_path / "run"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "32")  # as if stopped after the save at step 16
    (resumed / "metrics.jsonl").write_text("")
    train(_classify(resumed, data, export))
    rows = read_metrics(workdir / "metrics.jsonl")
    got = read_metrics(resumed / "metrics.jsonl")
    for kind in ("loss", "eval_loss"):  # train rows, then eval rows
        want = {r["step"]: r for r in rows if kind in r and r["step"] > 16}
        resumed_rows = {r["step"]: r for r in got if kind in r}
        assert sorted(resumed_rows) == sorted(want) and want
        for step, row in resumed_rows.items():
            for key in ("loss", "grad_norm", "eval_loss", "eval_accuracy"):
                if key in row:
                    assert row[key] == want[step][key], (step, key)


def test_predict_writes_what_eval_scores(classify_run, data, tmp_path, capsys):
    workdir, _ = classify_run
    assert cli.main(["eval", str(workdir)]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "predictions.jsonl"
    assert cli.main(["predict", str(workdir), "--input", str(data / "classify_validation.jsonl"),
                     "--output", str(out)]) == 0
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    truth = [json.loads(line)["label"] for line in (data / "classify_validation.jsonl").read_text().splitlines()]
    assert len(predictions) == len(truth) == 24
    assert all(0.5 <= p["probability"] <= 1.0 for p in predictions)
    accuracy = np.mean([p["label"] == t for p, t in zip(predictions, truth)])
    assert accuracy == pytest.approx(scored["eval_accuracy"], abs=1e-9)


def test_a_model_that_does_not_fit_the_export_is_one_line(data, export, tmp_path, capsys):
    args = ["train", f"workdir={tmp_path / 'run'}", "task.kind=classify", "data.source=jsonl",
            f"data.path={data}/classify_train.jsonl", f"init_from={export}", *TINY, "model.d_model=64"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.d_model=32" in err[0]


def test_a_decoder_fine_tunes_for_classification_from_its_last_token(data, tmp_path):
    config = load_config(None, [f"workdir={tmp_path / 'run'}", "task.kind=classify", "data.source=jsonl",
                                f"data.path={data}/classify_train.jsonl",
                                f"data.eval_path={data}/classify_validation.jsonl", *TINY, "model.arch=gpt2",
                                "optimizer.lr=1e-2", "train.steps=20", "train.eval_every=20"])
    assert config.pooling == "last"
    summary = train(config)
    assert summary["eval_accuracy"] >= 0.9 and summary["eval_macro_f1"] >= 0.9
