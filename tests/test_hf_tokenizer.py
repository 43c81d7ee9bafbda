"""Hugging Face tokenizers beside SentencePiece (data/hf_tokenizer.py, data/tokenizer.py) and their import
and export (hf/tokenizer_files.py): on the same text our ids are transformers' ids, both ways.

Every tokenizer is trained here on a few KB of the default corpus; transformers only reads local folders.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import pickle  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from llm_jax.config import ConfigError, ModelConfig, load_config  # noqa: E402
from llm_jax.data.corpus import default_corpus_root, list_default_files  # noqa: E402
from llm_jax.data.hf_tokenizer import HFTokenizer  # noqa: E402
from llm_jax.data.pipeline import MaskedDocumentCutter, SpanDocumentCutter  # noqa: E402
from llm_jax.data.tokenizer import Tokenizer, load_or_train_tokenizer, open_tokenizer, train_tokenizer  # noqa: E402
from llm_jax.hf.errors import HFConversionError  # noqa: E402
from llm_jax.hf.tokenizer_files import export_tokenizer, import_tokenizer  # noqa: E402

# Code, indentation, runs of spaces and tabs, CRLF, accents, and characters no tokenizer here has seen.
SAMPLE = ("def f(x):\n    return  x**2   # ünïcödé 日本語 😀\r\n\n\tHello, World! It's 3.14   end \n"
          "class A:\n        pass\n\n\n  x = [1, 2]  ")
PLAIN = "The quick brown fox jumps over the lazy dog, and then it runs home to sleep."


@pytest.fixture(scope="module")
def texts():
    return [f.read_text(errors="ignore")[:4000] for f in list_default_files(default_corpus_root())[:10]]


def _hf_ids(folder, text, special=False):
    return transformers.AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=special)["input_ids"]


@pytest.fixture(scope="module")
def gpt2_dir(texts, tmp_path_factory):
    """GPT-2's kind: byte-level BPE, `<|endoftext|>` bos, eos and unk at once, no pad."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("gpt2")
    end = "<|endoftext|>"
    hf = transformers.GPT2Tokenizer(tokenizer_object=tok, bos_token=end, eos_token=end, unk_token=end)
    hf.save_pretrained(folder)
    return folder


def test_gpt2_byte_level_bpe_imports_with_transformers_ids(gpt2_dir, tmp_path):
    import_tokenizer(gpt2_dir, tmp_path)
    ours = open_tokenizer(tmp_path)
    assert isinstance(ours, HFTokenizer)
    ids = ours.encode(SAMPLE)
    assert ids == _hf_ids(gpt2_dir, SAMPLE)
    assert ours.decode(ids) == SAMPLE
    # Byte-level BPE: every token is bytes of the text, so the sizes add up exactly.
    assert int(ours.piece_bytes()[ids].sum()) == len(SAMPLE.encode("utf-8"))
    end = transformers.AutoTokenizer.from_pretrained(gpt2_dir).convert_tokens_to_ids("<|endoftext|>")
    assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.pad_id) == (end, end, end, -1)
    assert ours.special_ids == (end,) and ours.sentinel_ids == () and ours.cls_id is None
    assert ours.decode([end, *ids, end]) == SAMPLE  # bos and eos decode to nothing
    worker = pickle.loads(pickle.dumps(ours))  # what grain's worker processes receive
    assert worker.encode_many([SAMPLE, PLAIN]) == [ids, ours.encode(PLAIN)]


def test_bert_wordpiece_imports_with_its_special_ids(texts, tmp_path):
    wordpiece = tokenizers.implementations.BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=400)
    hf_dir = tmp_path / "bert"
    transformers.BertTokenizer(tokenizer_object=wordpiece._tokenizer).save_pretrained(hf_dir)
    import_tokenizer(hf_dir, tmp_path / "ours")
    ours, ref = open_tokenizer(tmp_path / "ours"), transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = ours.encode(SAMPLE)
    assert ids == ref(SAMPLE, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids)
    assert (ours.cls_id, ours.sep_id, ours.mask_id, ours.pad_id, ours.unk_id) == (
        ref.cls_token_id, ref.sep_token_id, ref.mask_token_id, ref.pad_token_id, ref.unk_token_id)
    assert (ours.bos_id, ours.eos_id) == (-1, -1)
    assert {ours.cls_id, ours.sep_id, ours.mask_id, ours.pad_id, ours.unk_id} <= set(ours.special_ids)
    assert ours.encode("a [MASK] b")[1] == ours.mask_id
    # WordPiece drops spaces: the sizes count a word's leading space, not punctuation's, so about the length.
    plain = ours.encode(PLAIN)
    assert abs(int(ours.piece_bytes()[plain].sum()) - len(PLAIN)) <= 2
    # The masked-LM pipeline frames pieces with [CLS] ... [SEP] and never masks or scores them.
    pieces = MaskedDocumentCutter(ours, 16, (0,))(0, PLAIN * 4)
    inputs, weights = np.concatenate([p["inputs"] for p in pieces]), np.concatenate([p["weights"] for p in pieces])
    assert all(p["inputs"][0] == ours.cls_id and p["inputs"][-1] == ours.sep_id for p in pieces)
    assert ours.mask_id in inputs and not weights[np.isin(inputs, [ours.cls_id, ours.sep_id])].any()


def _sentencepiece_folder(texts, folder, kind):
    """A folder as Llama-2 (tokenizer.model: BPE, byte fallback, unk 0 bos 1 eos 2, no pad) or T5
    (spiece.model: unigram, pad 0 eos 1 unk 2, no bos, 10 sentinels added by transformers) ship it."""
    folder.mkdir()
    if kind == "llama":
        name, config = "tokenizer.model", {"tokenizer_class": "LlamaTokenizer"}
        settings = dict(model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                        allow_whitespace_only_pieces=True)
    else:
        name, config = "spiece.model", {"tokenizer_class": "T5Tokenizer", "extra_ids": 10}
        settings = dict(model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(folder / "spm"), vocab_size=400,
                                   minloglevel=2, **settings)
    os.replace(folder / "spm.model", folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_sentencepiece_folders_import_with_transformers_ids(texts, tmp_path, kind):
    only_spm = _sentencepiece_folder(texts, tmp_path / "spm_only", kind)
    ref = transformers.AutoTokenizer.from_pretrained(only_spm)
    with_json = tmp_path / "with_json"
    ref.save_pretrained(with_json)  # tokenizer.json, as most published folders hold it
    expected = ref(SAMPLE, add_special_tokens=False)["input_ids"]
    for folder, implementation in ((only_spm, Tokenizer), (with_json, HFTokenizer)):
        import_tokenizer(folder, tmp_path / f"{folder.name}_in")
        ours = open_tokenizer(tmp_path / f"{folder.name}_in")
        assert isinstance(ours, implementation)
        assert ours.encode(SAMPLE) == expected
        assert ours.vocab_size == len(ref)
        if kind == "llama":
            assert (ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2, -1)
        else:
            assert (ours.pad_id, ours.eos_id, ours.unk_id, ours.bos_id) == (0, 1, 2, -1)
            # transformers numbers T5's sentinels down from the end of the vocabulary.
            assert ours.sentinel_ids == tuple(ref.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(10))
            assert ours.sentinel_ids == tuple(range(len(ref) - 1, len(ref) - 11, -1))
            # Span corruption marks the first dropped span with <extra_id_0> and ends targets with eos.
            [piece, *_] = SpanDocumentCutter(ours, 32, 8, 10, (0,))(0, PLAIN * 2)
            assert piece["targets"][0] == ours.sentinel_ids[0] == ref.convert_tokens_to_ids("<extra_id_0>")
            assert ours.sentinel_ids[0] in piece["encoder_inputs"] and piece["targets"][-1] == ours.eos_id
    # Exported back from spm.model: transformers reads our tokenizer.json with the same ids, and its default
    # encode frames text as our generate does (a decoder: bos first; an encoder-decoder: eos last).
    export_tokenizer(tmp_path / "spm_only_in", tmp_path / "out", ModelConfig(arch=kind))
    assert _hf_ids(tmp_path / "out", SAMPLE) == expected
    framed = _hf_ids(tmp_path / "out", PLAIN, special=True)
    assert framed == ([1, *ref(PLAIN, add_special_tokens=False)["input_ids"]] if kind == "llama" else
                      [*ref(PLAIN, add_special_tokens=False)["input_ids"], 1])


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_own_sentencepiece_exports_with_the_same_ids(texts, tmp_path, model_type):
    (tmp_path / "run").mkdir()
    train_tokenizer(texts, tmp_path / "run" / "spm", 400, model_type, True, ("[MASK]", "<|user|>"))
    ours = Tokenizer(tmp_path / "run" / "spm.model")
    export_tokenizer(tmp_path / "run", tmp_path / "out", ModelConfig())
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = SAMPLE + " [MASK] then<|user|> " + texts[3][:1500]
    ids = ours.encode(text)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert hf.decode(ids) == text
    assert hf(PLAIN)["input_ids"] == [ours.bos_id, *ours.encode(PLAIN)]  # what generate feeds a decoder
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.mask_token_id) == (
        ours.pad_id, ours.unk_id, ours.bos_id, ours.eos_id, ours.user_defined["[MASK]"])
    # And imported again (a model exported, then imported): the tokenizer.json gives our ids.
    import_tokenizer(tmp_path / "out", tmp_path / "back")
    assert open_tokenizer(tmp_path / "back").encode(text) == ids


def test_refusals_are_one_line(tmp_path, gpt2_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFConversionError, match="holds no tokenizer") as err:
        import_tokenizer(tmp_path / "empty", tmp_path / "a")
    assert "\n" not in str(err.value)
    with pytest.raises(HFConversionError, match="holds no tokenizer"):
        export_tokenizer(tmp_path / "empty", tmp_path / "b", ModelConfig())
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(HFConversionError, match="not a Hugging Face tokenizer.json") as err:
        import_tokenizer(corrupt, tmp_path / "c")
    assert "\n" not in str(err.value)

    def run_tokenizer(name, *overrides):
        config = load_config(None, [f"workdir={tmp_path / name}", *overrides])
        return load_or_train_tokenizer(config, config.workdir, sources=None)

    with pytest.raises(ConfigError, match="^tokenizer.path: .*not a SentencePiece model or a Hugging Face"):
        run_tokenizer("r1", f"tokenizer.path={corrupt / 'tokenizer.json'}")
    # A gpt2 tokenizer has bos and eos, which a decoder needs, but not what an encoder frames text with.
    assert run_tokenizer("r2", f"tokenizer.path={gpt2_dir}").bos_id >= 0
    with pytest.raises(ConfigError, match=r"lacks \[CLS\], \[SEP\], \[MASK\], which train.objective=mlm needs"):
        run_tokenizer("r3", f"tokenizer.path={gpt2_dir / 'tokenizer.json'}", "model.arch=bert")
    assert not (tmp_path / "r3" / "tokenizer" / "tokenizer.json").exists()  # nothing half-written is left


def test_a_run_trains_resumes_exports_and_generates_with_a_tokenizer_json(tmp_path, gpt2_dir):
    from llm_jax.commands.export import export_run
    from llm_jax.train import loop
    from llm_jax.train.metrics import read_metrics

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.txt").write_text(f"def main_{i}():\n    return {i} * 2  # ünïcödé\n" * 20)

    def config(steps):
        # test_trainer.py's runs, but for tokenizer.path: the same programs, which the suite then compiles
        # once (JAX's persistent cache, conftest.py).
        return load_config("configs/tiny.yaml", [
            f"workdir={tmp_path / 'run'}", "data.source=text", f"data.path={corpus}/*.txt",
            f"data.prepared_dir={tmp_path / 'prepared'}", "model.vocab_size=300", "tokenizer.sample_bytes=100000",
            "train.progress=false", "train.seq_len=32", "train.batch_size=8", "train.eval_every=20",
            "train.log_every=5", "checkpoint.every=10", "optimizer.lr=3e-3", "optimizer.warmup_steps=5",
            "train.sample_tokens=8", f"train.steps={steps}", f"tokenizer.path={gpt2_dir / 'tokenizer.json'}"])

    loop.train(config(15))
    summary = loop.train(config(25))  # resumes from step 15 with the tokenizer the run copied
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == [5, 10, 15, 20, 25]
    assert sorted(os.listdir(tmp_path / "run" / "tokenizer")) == ["tokenizer.json", "tokenizer_config.json"]
    assert isinstance(summary["sample"], str)  # the run's closing sample, decoded by the tokenizer.json
    export_run(tmp_path / "run", tmp_path / "export")
    assert (tmp_path / "export" / "tokenizer" / "tokenizer.json").is_file()
    setup, params, step = loop.restore_for_inference(tmp_path / "export", with_data=False)
    assert isinstance(setup.tokenizer, HFTokenizer) and step == 25
    text = loop.sample_text(setup, params, "def main", max_new_tokens=8, temperature=0.0, top_k=0, seed=0)
    assert text.startswith("def main") and len(text) > len("def main")
