"""The lm-evaluation-harness adapter (commands/lm_eval_model.py, `llm-jax harness`): a local multiple-choice task
scored through lm-eval against our scoring API, rolling log-likelihoods against plain forward passes,
generate_until against `generate`. Offline: the task's data is a local JSON file."""

import json
import types

import jax
import jax.numpy as jnp
import lm_eval
import lm_eval.api.registry
import numpy as np
import pytest
from test_generate import model_with_drawn_params

from llm_jax import cli
from llm_jax.commands import generate as generate_cmd
from llm_jax.commands import lm_eval_model
from llm_jax.config import load_config
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.infer import scoring
from llm_jax.infer.generate import Decoding
from llm_jax.infer.sampling import Sampling
from llm_jax.train import checkpoint as ckpt

TEXTS = ["The capital of France is Paris. The capital of Italy is Rome. Water is wet and fire is hot.\n",
         "Question: what colour is the sky? Answer: blue. Question: what is two plus two? Answer: four.\n",
         "Cats chase mice, dogs chase cats, and birds sing in the morning near the river bank.\n"] * 20
DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "blue"], "gold": 0},
    {"question": "Water is", "choices": ["wet", "hot"], "gold": 0},
    {"question": "what colour is the sky? Answer:", "choices": ["blue", "four", "mice"], "gold": 0},
    {"question": "Cats chase", "choices": ["dogs", "mice"], "gold": 1},
    {"question": "birds sing in the", "choices": ["morning", "river", "capital"], "gold": 0},
    {"question": "two plus two is", "choices": ["four", "France"], "gold": 0},
]
TASK_YAML = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module", autouse=True)
def offline_datasets(tmp_path_factory):
    """datasets offline, its cache in a temporary folder, for this file's tests (datasets reads the
    variables when first imported, so its config is set too, should another test have imported it)."""
    import datasets.config

    cache = tmp_path_factory.mktemp("hf_datasets")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_DATASETS_CACHE", str(cache))):
            mp.setenv(name, value)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny gpt2 export (random params, float32) with a SentencePiece tokenizer trained on TEXTS,
    and a folder holding the local task."""
    root = tmp_path_factory.mktemp("harness")
    (root / "tok").mkdir()
    train_tokenizer(TEXTS, root / "tok" / "spm", vocab_size=160, byte_fallback=False)  # words, not bytes
    config = load_config(None, ["model.arch=gpt2", "model.vocab_size=160", "tokenizer.byte_fallback=false",
                                "model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.d_ff=64",
                                "model.max_len=32", "train.seq_len=32"])
    _, params = model_with_drawn_params(config.model, seed=0, std=0.2)
    ckpt.export_params(root / "export", params, config, root / "tok", {"step": 0})
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "local_mc.yaml").write_text(TASK_YAML.format(data=tasks / "docs.jsonl"))
    return root / "export", tasks


@pytest.fixture(scope="module")
def lm(export):
    return lm_eval_model.LLMJaxLM(workdir=str(export[0]), batch_size=4)


def requests(*args):
    return [types.SimpleNamespace(args=a) for a in args]


@pytest.fixture(scope="module")
def direct(lm):
    """Each doc's choices' log-likelihoods by our scoring API, as the task asks (context, " " + choice),
    in one call: the adapter's batch shape, so one compiled program serves both."""
    setup = lm._setup
    pairs = [(doc["question"], " " + c) for doc in DOCS for c in doc["choices"]]
    with setup.context(split_batch=False):
        scores = iter(ll for ll, _ in scoring.loglikelihood(setup.model, lm._params, setup.tokenizer, pairs,
                                                           batch_size=4))
    return [[next(scores) for _ in doc["choices"]] for doc in DOCS]


def accuracy(direct, docs):
    return np.mean([int(np.argmax(s)) == d["gold"] for s, d in zip(direct, docs)])


def test_multiple_choice_task_scores_our_loglikelihoods(lm, export, direct):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(export[1]), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["local_mc"], task_manager=manager, log_samples=True,
                                      bootstrap_iters=0, torch_random_seed=None)  # torch is not ours to import
    samples = sorted(results["samples"]["local_mc"], key=lambda s: s["doc_id"])
    for sample, scores in zip(samples, direct):  # every choice's log-likelihood, in the request's place
        np.testing.assert_allclose([r[0] for r in sample["filtered_resps"]], scores, atol=1e-4)
    acc = accuracy(direct, DOCS)
    acc_norm = np.mean([int(np.argmax([x / len(c) for x, c in zip(s, d["choices"])])) == d["gold"]  # per character
                        for s, d in zip(direct, DOCS)])
    metrics = results["results"]["local_mc"]
    assert metrics["acc,none"] == pytest.approx(acc) and metrics["acc_norm,none"] == pytest.approx(acc_norm)


def test_harness_command_and_registered_name(export, tmp_path, capsys, direct):
    out = tmp_path / "results.json"
    code = cli.main(["harness", str(export[0]), "--tasks", "local_mc", "--include-path", str(export[1]),
                     "--limit", "4", "--output", str(out)])
    assert code == 0 and "local_mc" in capsys.readouterr().out
    acc = json.loads(out.read_text())["results"]["local_mc"]["acc,none"]
    assert acc == pytest.approx(accuracy(direct[:4], DOCS[:4]))
    # lm-eval's name for it, once commands/lm_eval_model.py is imported: simple_evaluate(model="llm_jax", ...)
    assert lm_eval.api.registry.get_model("llm_jax") is lm_eval_model.LLMJaxLM
    assert cli.main(["harness", str(export[0]), "--tasks", "local_mc", "--include-path",
                     str(tmp_path / "missing")]) == 2


def test_loglikelihood_token_boundaries_order_and_truncation(lm):
    tok = lm.tokenizer
    long_context = " ".join((TEXTS[0] + TEXTS[1]).split())
    assert len(tok.encode(long_context)) > lm.max_length
    asked = [("The capital of France is", " Paris"), ("Water is ", "wet"), ("", "Cats chase mice"),
             (long_context, " Rome"), ("Water is", " wet")]
    together = lm.loglikelihood(requests(*asked))
    alone = [lm.loglikelihood(requests(a))[0] for a in asked]
    np.testing.assert_allclose([x for x, _ in together], [x for x, _ in alone], atol=1e-5)  # order kept
    setup = lm._setup
    with setup.context(split_batch=False):
        (paris, _), (empty, _), (long, _) = scoring.score_ids(setup.model, lm._params, [
            ([tok.bos_id, *tok.encode("The capital of France is")], tok.encode(" Paris")),
            ([tok.bos_id], tok.encode("Cats chase mice")),
            # a row longer than the model's positions keeps its last max_length + 1 ids
            (([tok.bos_id, *tok.encode(long_context + " Rome")])[-33:-len(tok.encode(" Rome"))],
             tok.encode(" Rome"))], batch_size=4)
    assert together[0][0] == pytest.approx(paris, abs=1e-4)
    assert together[2][0] == pytest.approx(empty, abs=1e-4)
    assert together[3][0] == pytest.approx(long, abs=1e-4)
    # a context's trailing space belongs to the continuation, as Hugging Face's adapter has it
    assert together[1][0] == pytest.approx(together[4][0], abs=1e-5)


def plain_logprobs(lm, row):
    """log p(row[t + 1] | row[:t + 1]) by one forward pass of the whole row, no cache, no scoring code."""
    setup = lm._setup
    logits = np.asarray(setup.model.apply({"params": lm._params}, jnp.asarray([row[:-1]])))[0].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return logprobs[np.arange(len(row) - 1), row[1:]]


def test_loglikelihood_rolling_scores_every_token_once(lm, export):
    tok = lm.tokenizer
    short, text = "Cats chase mice, dogs chase cats.", "".join(TEXTS[:3]) * 2
    row = [tok.bos_id, *tok.encode(text)]
    assert len(row) > 3 * 32 and len(tok.encode(short)) < 32
    got_short, got_long = lm.loglikelihood_rolling(requests((short,), (text,)))
    assert got_short == pytest.approx(plain_logprobs(lm, [tok.bos_id, *tok.encode(short)]).sum(), abs=1e-3)
    # Windows of 32 predictions; the last one after a full row of context (lm-eval's rolling windows).
    expected = plain_logprobs(lm, row[:33]).sum()
    end = 33
    while end < len(row):
        new = min(32, len(row) - end)
        window = row[end + new - 33:end + new]
        expected += plain_logprobs(lm, window)[-new:].sum()
        end += new
    assert got_long == pytest.approx(expected, abs=1e-3)
    with lm._setup.context(split_batch=False):
        windows_of_one = scoring.loglikelihood_rolling(lm._setup.model, lm._params, tok, [short])
    assert got_short == pytest.approx(windows_of_one[0], abs=1e-4)


def test_generate_until_equals_generate_with_a_stop_string(lm):
    prompts = ["The capital of France is", "Cats chase"]
    greedy = Decoding(max_new_tokens=12, sampling=Sampling(temperature=0.0))
    plain = generate_cmd.generate_texts(lm._setup, lm._params, prompts, greedy, stops=[], seed=0, batch_size=2)
    stop = plain[0]["text"][3:5]
    assert stop and plain[0]["text"].find(stop) < len(plain[0]["text"]) - 2
    expected = generate_cmd.generate_texts(lm._setup, lm._params, prompts, greedy, stops=[stop], seed=0,
                                           batch_size=2)
    stopped, unstopped = {"until": [stop], "max_gen_toks": 12, "do_sample": False}, {"max_gen_toks": 12}
    got = lm.generate_until(requests((prompts[0], stopped), (prompts[0], unstopped), (prompts[1], unstopped),
                                     (prompts[1], stopped)))  # two groups of gen_kwargs, answers in place
    assert got == [expected[0]["text"], plain[0]["text"], plain[1]["text"], expected[1]["text"]]
    assert len(got[0]) < len(plain[0]["text"])
    with pytest.raises(lm_eval_model.HarnessError, match="'typical_p' is not supported"):
        lm.generate_until(requests((prompts[0], {"typical_p": 0.9})))


def test_encoder_decoder_scores_given_the_encoded_context_and_an_encoder_is_refused(lm):
    from llm_jax.config import Config, ModelConfig
    from llm_jax.models.build import make_model
    from llm_jax.parallel import mesh as mesh_lib
    from llm_jax.train import loop

    def bare(model_config, params):
        config = Config(model=model_config)
        return loop.Setup(config=config, workdir=None, mesh=mesh_lib.make_mesh(config), model=make_model(model_config),
                          tx=None, schedule=None, abstract_state=None, state_shardings=None, tokenizer=lm.tokenizer,
                          sources=None)

    shape = dict(vocab_size=160, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_len=32)
    with pytest.raises(lm_eval_model.HarnessError, match="encoder"):
        lm_eval_model.LLMJaxLM(setup=bare(ModelConfig(arch="bert", **shape), None), params=None)
    t5_model, t5_params = model_with_drawn_params(ModelConfig(arch="t5", **shape), seed=1, std=0.2)
    t5 = lm_eval_model.LLMJaxLM(setup=bare(t5_model.config, t5_params), params=t5_params)
    tok = lm.tokenizer
    got = t5.loglikelihood(requests(("Water is", " wet")))[0][0]
    with jax.set_mesh(t5._setup.mesh):
        [(expected, _)] = scoring.score_ids(t5_model, t5_params, [(tok.encode("Water is") + [tok.eos_id],
                                                                    tok.encode(" wet"))])
    assert got == pytest.approx(expected, abs=1e-5)
