"""A supervised seq2seq task learned end to end: JSONL input/target pairs -> a t5 run -> greedy decoding
of inputs it never saw.

The task is sorting five digits (repeats allowed, so the model must count, not only order): the
answer is exact or wrong, so exact match on held-out inputs says whether the encoder-decoder, the
pair packing and generation work together.
"""

import json
import random

import jax
import pytest

from llm_jax.config import load_config
from llm_jax.infer.generate import generate
from llm_jax.train.loop import restore_for_inference, train


def _sorting_examples(count: int, rng: random.Random, exclude: set[str]) -> list[dict[str, str]]:
    examples = []
    while len(examples) < count:
        digits = [rng.randrange(10) for _ in range(5)]
        text = " ".join(map(str, digits))
        if text in exclude:
            continue
        exclude.add(text)
        examples.append({"input": text, "target": " ".join(map(str, sorted(digits)))})
    return examples


@pytest.fixture(scope="module")
def sorting_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("sorting")
    rng, seen = random.Random(0), set()
    train_rows = _sorting_examples(3000, rng, seen)
    held_out = _sorting_examples(100, rng, seen)  # never in the training file
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    return root, held_out


def test_a_seq2seq_run_sorts_digits_it_never_saw(tmp_path, sorting_task):
    root, held_out = sorting_task
    workdir = tmp_path / "run"
    config = load_config(None, [
        f"workdir={workdir}", "model.arch=t5", "train.objective=seq2seq", "data.source=jsonl",
        f"data.path={root}/train.jsonl", f"data.prepared_dir={tmp_path / 'prepared'}",
        # Digits, spaces and the four specials: a 16-piece tokenizer without sentinels or bytes.
        "model.vocab_size=16", "tokenizer.byte_fallback=false", "tokenizer.extra_ids=0",
        "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.d_ff=128",
        "train.seq_len=24", "train.batch_size=16", "train.steps=250", "train.eval_every=250", "train.log_every=50",
        "train.progress=false", "optimizer.lr=3e-3", "optimizer.warmup_steps=20", "checkpoint.every=250",
        "train.sample_prompt=3 1 2", "train.sample_tokens=12"])
    train(config)

    setup, params, _ = restore_for_inference(workdir)
    tok = setup.tokenizer
    exact = 0
    for example in held_out:
        prompt = tok.encode(example["input"]) + [tok.eos_id]  # as the run's encoder inputs end
        out = generate(setup.model, params, prompt, max_new_tokens=16, rng=jax.random.key(0), temperature=0.0,
                       eos_id=tok.eos_id)
        assert out and out[-1] == tok.eos_id, "greedy decoding ends its answer with eos"
        exact += tok.decode(out[:-1]) == example["target"]
    assert exact / len(held_out) >= 0.9, f"exact match {exact}/{len(held_out)} on held-out inputs"
