"""Tests of llm_jax.data.tokenizer: training on a tiny corpus, special ids, round trips, reuse, errors."""

import json
import pickle
import random
import shutil

import numpy as np
import pytest

from llm_jax.config import ConfigError, load_config
from llm_jax.data import tokenizer as tok_lib

VOCAB = 320


def _tiny_corpus(n_docs=60, seed=0):
    """Small Python-like documents; enough distinct text for a few hundred pieces."""
    rng = random.Random(seed)
    words = ["value", "index", "total", "result", "count", "items", "name", "data", "line", "parts"]
    docs = []
    for d in range(n_docs):
        lines = [f"def function_{d}({rng.choice(words)}, {rng.choice(words)}):"]
        for _ in range(rng.randint(3, 8)):
            a, b = rng.choice(words), rng.choice(words)
            lines.append(f"    {a} = {b} + {rng.randint(0, 999)}  # update {a}")
        lines.append(f"    return {rng.choice(words)}\n")
        docs.append("\n".join(lines))
    return docs


class _Sources:
    def __init__(self, train):
        self.train = train
        self.eval = []


class _Forbidden:
    """A source that fails when read: proves that a reload does not touch the corpus."""

    def __len__(self):
        raise AssertionError("the corpus was read although the tokenizer exists")

    def __getitem__(self, index):
        raise AssertionError("the corpus was read although the tokenizer exists")


def _config(*overrides):
    return load_config(None, [f"model.vocab_size={VOCAB}", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    return tok_lib.load_or_train_tokenizer(_config(), workdir, _Sources(_tiny_corpus())), workdir


def test_trains_with_the_special_ids(trained):
    tok, workdir = trained
    assert tok.path == workdir / "tokenizer" / "spm.model"
    assert tok.path.is_file() and tok.path.with_suffix(".vocab").is_file()
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == VOCAB
    assert not [p for p in tok.path.parent.iterdir() if p.name.startswith(".spm-")]  # no temp left


def test_round_trip_keeps_code_whitespace(trained):
    tok, _ = trained
    text = "def function_7(value, data):\n    total = count + 12  # update total\n\n\treturn  items\n"
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.unk_id not in ids and tok.bos_id not in ids and tok.eos_id not in ids
    assert len(ids) < len(text)  # it learned merges, not only characters
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int32)) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert tok.decode([*ids, tok.vocab_size, tok.vocab_size + 27]) == text  # a padded vocabulary's rows


def test_byte_fallback_for_unseen_characters(trained):
    tok, _ = trained
    text = "snowman ☃ and 日本語 and é"
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    pieces = [tok._sp.id_to_piece(i) for i in ids]
    assert "<0xE2>" in pieces  # first UTF-8 byte of the snowman
    assert tok.decode(ids) == text


def test_reloads_from_workdir_instead_of_retraining(trained):
    tok, workdir = trained
    before = tok.path.stat().st_mtime_ns
    again = tok_lib.load_or_train_tokenizer(_config(), workdir, _Sources(_Forbidden()))
    assert again.path == tok.path and tok.path.stat().st_mtime_ns == before
    text = "return result + 5\n"
    assert again.encode(text) == tok.encode(text)


def test_too_small_corpus_is_a_one_line_config_error(tmp_path):
    sources = _Sources(["tiny text, tiny text.\n"] * 3)
    with pytest.raises(ConfigError, match=r"model\.vocab_size=2048 is too large") as err:
        tok_lib.load_or_train_tokenizer(_config("model.vocab_size=2048"), tmp_path, sources)
    assert "\n" not in str(err.value) and "at most" in str(err.value)
    assert not (tmp_path / "tokenizer" / "spm.model").exists()


def test_vocab_below_the_characters_of_the_corpus_is_a_one_line_config_error(tmp_path):
    # 40 distinct non-ASCII characters: with 256 byte pieces and 4 specials they need 300 pieces.
    sources = _Sources(["".join(chr(0x400 + i) for i in range(40)) * 20 + "\n"] * 5)
    with pytest.raises(ConfigError, match=r"model\.vocab_size=270 is too small") as err:
        tok_lib.load_or_train_tokenizer(_config("model.vocab_size=270"), tmp_path, sources)
    assert "\n" not in str(err.value)


def test_loaded_vocab_larger_than_model_is_a_config_error(trained, tmp_path):
    tok, _ = trained
    given = tmp_path / "given.model"
    shutil.copyfile(tok.path, given)
    small = _config("model.vocab_size=300", f"tokenizer.path={given}")
    with pytest.raises(ConfigError, match=r"model\.vocab_size \(300\)"):
        tok_lib.load_or_train_tokenizer(small, tmp_path / "run", _Sources(_Forbidden()))
    # An existing workdir tokenizer is checked the same way.
    with pytest.raises(ConfigError, match=r"model\.vocab_size \(300\)"):
        tok_lib.load_or_train_tokenizer(small, tok.path.parent.parent, _Sources(_Forbidden()))


def test_given_tokenizer_path_is_copied_into_workdir(trained, tmp_path):
    tok, _ = trained
    given = tmp_path / "given.model"
    shutil.copyfile(tok.path, given)
    config = _config("model.vocab_size=512", f"tokenizer.path={given}")
    loaded = tok_lib.load_or_train_tokenizer(config, tmp_path / "run", _Sources(_Forbidden()))
    assert loaded.path == tmp_path / "run" / "tokenizer" / "spm.model"
    assert loaded.path.read_bytes() == given.read_bytes()
    with pytest.raises(ConfigError, match="tokenizer.path"):
        tok_lib.load_or_train_tokenizer(_config(f"tokenizer.path={tmp_path / 'missing.model'}"),
                                        tmp_path / "run2", _Sources(_Forbidden()))


def test_sample_spans_the_corpus_and_respects_the_size():
    docs = [f"document number {i}\n" * 50 for i in range(200)]  # ~1 KB each
    sample = tok_lib.sample_documents(docs, sample_bytes=20_000, seed=0)
    total = sum(len(t.encode()) for t in sample)
    assert 20_000 <= total < 22_000
    numbers = sorted(int(t.split()[2]) for t in sample)
    assert numbers[0] < 50 and numbers[-1] > 150  # drawn across the corpus, not its first files
    assert tok_lib.sample_documents(docs, 20_000, seed=0) == sample
    huge = ["line of text\n" * 100_000]
    (cut,) = tok_lib.sample_documents(huge, sample_bytes=100_000)
    assert 0 < len(cut.encode()) <= tok_lib._SENTENCE_BYTES  # one document is a small share
    assert cut.endswith("\n")


def test_sentences_keep_all_text_and_fit_the_limit():
    text = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(500)) + "y" * 5000
    parts = list(tok_lib._sentences([text]))
    assert "".join(parts) == text
    assert max(len(p.encode()) for p in parts) <= tok_lib._SENTENCE_BYTES


def test_unigram_model_type_trains(tmp_path):
    config = _config("tokenizer.model_type=unigram")
    tok = tok_lib.load_or_train_tokenizer(config, tmp_path, _Sources(_tiny_corpus(30)))
    text = "result = data + 3\n"
    assert tok.decode(tok.encode(text)) == text and tok.bos_id == 2
    assert isinstance(tok_lib.Tokenizer(tok.path), tok_lib.Tokenizer)



def test_user_defined_symbols_are_single_tokens_after_the_specials(tmp_path):
    config = _config('tokenizer.user_defined_symbols=["<|user|>", "<|end|>"]')
    tok = tok_lib.load_or_train_tokenizer(config, tmp_path, _Sources(_tiny_corpus(30)))
    assert [tok._sp.id_to_piece(i) for i in (4, 5)] == ["<|user|>", "<|end|>"]
    text = "<|user|>return value<|end|>"
    ids = tok.encode(text)
    assert ids[0] == 4 and ids[-1] == 5 and ids.count(4) == ids.count(5) == 1
    assert tok.decode(ids) == text
    assert tok.vocab_size == VOCAB


def test_train_into_a_folder_writes_the_model_and_a_summary(tmp_path):
    sources = _Sources(_tiny_corpus(60))
    sources.eval = _tiny_corpus(10, seed=1)  # held out: never in the training sample
    summary = tok_lib.train_tokenizer_into(_config(), sources, tmp_path / "tok")
    files = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert files == ["spm.model", "spm.vocab", "summary.json"]
    assert json.loads((tmp_path / "tok" / "summary.json").read_text()) == summary
    assert summary["vocab_size"] == VOCAB and summary["model_type"] == "bpe"
    assert summary["held_out_documents"] == 10
    held_out = "".join(sources.eval)
    tok = tok_lib.Tokenizer(tmp_path / "tok" / "spm.model")
    assert summary["held_out_bytes_per_token"] == pytest.approx(
        len(held_out.encode()) / sum(len(tok.encode(t)) for t in sources.eval), rel=1e-3)
    assert summary["held_out_bytes_per_token"] > 1.5  # merges learned: well above one byte a token
    before = (tmp_path / "tok" / "spm.model").read_bytes()
    with pytest.raises(ConfigError, match="never replaced"):
        tok_lib.train_tokenizer_into(_config("model.vocab_size=300"), sources, tmp_path / "tok")
    assert (tmp_path / "tok" / "spm.model").read_bytes() == before


def test_tokenizer_pickles_without_its_file(trained, tmp_path):
    tok, _ = trained
    copy = shutil.copyfile(tok.path, tmp_path / "moved.model")
    original = tok_lib.Tokenizer(copy)
    blob = pickle.dumps(original)
    copy.unlink()  # a worker process may not see the file
    clone = pickle.loads(blob)
    text = "def f(value):\n    return value + 1\n"
    assert clone.encode(text) == tok.encode(text)
    assert (clone.bos_id, clone.eos_id, clone.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)


def test_with_several_processes_process_0_alone_trains_and_the_others_wait(trained, tmp_path, monkeypatch):
    import jax
    from jax.experimental import multihost_utils

    tok, _ = trained
    events = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)

    def process_0_trains_meanwhile(name):  # the barrier: process 0 is done when every process is past it
        events.append("barrier")
        (tmp_path / "tokenizer").mkdir(exist_ok=True)
        shutil.copyfile(tok.path, tmp_path / "tokenizer" / "spm.model")

    monkeypatch.setattr(multihost_utils, "sync_global_devices", process_0_trains_meanwhile)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    loaded = tok_lib.load_or_train_tokenizer(_config(), tmp_path, _Sources(_Forbidden()))  # never trains
    assert events == ["barrier"] and loaded.path.read_bytes() == tok.path.read_bytes()

    # Process 0 trains before the barrier; a failure is raised after it, so no process waits forever.
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: events.append(name))
    trained_by_0 = tok_lib.load_or_train_tokenizer(_config(), tmp_path / "run", _Sources(_tiny_corpus()))
    assert trained_by_0.path.is_file() and events[-1] == "llm_jax_tokenizer"
    with pytest.raises(ConfigError, match="too large"):
        tok_lib.load_or_train_tokenizer(_config("model.vocab_size=2048"), tmp_path / "bad", _Sources(["a b\n"] * 3))
    assert events.count("llm_jax_tokenizer") == 2


# ----------------------------------------------------------------------------- masked-LM symbols


def test_an_mlm_run_trains_cls_sep_mask_as_ids_4_5_6_before_the_user_symbols(tmp_path):
    config = _config("model.arch=bert", 'tokenizer.user_defined_symbols=["<|user|>", "[MASK]"]')
    tok = tok_lib.load_or_train_tokenizer(config, tmp_path, _Sources(_tiny_corpus(30)))
    assert (tok.cls_id, tok.sep_id, tok.mask_id) == (4, 5, 6)
    assert [tok._sp.id_to_piece(i) for i in range(4, 8)] == ["[CLS]", "[SEP]", "[MASK]", "<|user|>"]
    assert tok.special_ids == (0, 1, 2, 3, 4, 5, 6, 7)
    ids = tok.encode("for i in [MASK](10):")
    assert ids.count(tok.mask_id) == 1 and tok.decode(ids) == "for i in [MASK](10):"
    assert tok.encode("[MASK]") == [tok.mask_id]
    assert pickle.loads(pickle.dumps(tok)).special_ids == tok.special_ids  # as in a data worker


def test_a_tokenizer_without_mask_symbols_for_an_mlm_run_is_a_one_line_config_error(trained, tmp_path):
    tok, workdir = trained  # trained for a clm run
    assert (tok.cls_id, tok.sep_id, tok.mask_id) == (None, None, None)
    assert tok.special_ids == (0, 1, 2, 3)
    mlm = _config("model.arch=bert")
    with pytest.raises(ConfigError, match=r"^workdir: .*lacks \[CLS\], \[SEP\], \[MASK\]") as err:
        tok_lib.load_or_train_tokenizer(mlm, workdir, _Sources(_Forbidden()))
    assert "\n" not in str(err.value)
    given = tmp_path / "given.model"
    shutil.copyfile(tok.path, given)
    with pytest.raises(ConfigError, match=r"^tokenizer.path: .*train.objective=mlm") as err:
        tok_lib.load_or_train_tokenizer(_config("model.arch=bert", f"tokenizer.path={given}"), tmp_path / "run",
                                        _Sources(_Forbidden()))
    assert "\n" not in str(err.value) and not (tmp_path / "run" / "tokenizer" / "spm.model").exists()
    assert f"the tokenizer {given} lacks" in str(err.value)  # the user's file, not the temporary copy checked
    with pytest.raises(ConfigError, match=rf"vocabulary \({tok.vocab_size}\) in {given};"):
        tok_lib.load_or_train_tokenizer(_config(f"model.vocab_size={tok.vocab_size - 1}", f"tokenizer.path={given}"),
                                        tmp_path / "run", _Sources(_Forbidden()))


def test_the_vocab_floor_counts_the_mlm_symbols():
    _config("model.vocab_size=260")  # clm: pad, unk, bos, eos and 256 bytes
    with pytest.raises(ConfigError, match=r"at least 263 .* \[MASK\] for mlm"):
        _config("model.arch=bert", "model.vocab_size=262")
    with pytest.raises(ConfigError, match="at least 264"):  # [MASK] listed again is one piece
        _config("model.arch=bert", "model.vocab_size=263", 'tokenizer.user_defined_symbols=["[MASK]", "<x>"]')


# ----------------------------------------------------------------------------- sentinels (span corruption, seq2seq)


def _t5_config(*overrides):
    return _config("model.arch=t5", "train.seq_len=32", *overrides)


def test_a_t5_run_trains_its_sentinels_after_the_four_and_refuses_a_tokenizer_without_them(trained, tmp_path):
    config = _config("model.arch=t5", "train.seq_len=32", "tokenizer.extra_ids=5",
                     'tokenizer.user_defined_symbols=["<|user|>"]')
    tok = tok_lib.load_or_train_tokenizer(config, tmp_path / "t5", _Sources(_tiny_corpus(30)))
    assert tok.sentinel_ids == (4, 5, 6, 7, 8) and tok.user_defined["<|user|>"] == 9
    assert tok.special_ids == tuple(range(10)) and tok.mask_id is None
    ids = tok.encode("x = <extra_id_3>(1)")
    assert ids.count(7) == 1 and tok.decode(ids) == "x = <extra_id_3>(1)"
    assert pickle.loads(pickle.dumps(tok)).sentinel_ids == tok.sentinel_ids  # as in a data worker

    clm_tok, workdir = trained  # trained for a clm run: no sentinels
    assert clm_tok.sentinel_ids == ()
    for objective in ("span", "seq2seq"):
        with pytest.raises(ConfigError, match=rf"^workdir: .* has 0 of the 5 sentinels .*objective={objective}") as err:
            tok_lib.load_or_train_tokenizer(_config("model.arch=t5", "train.seq_len=32", "tokenizer.extra_ids=5",
                                                    f"train.objective={objective}"), workdir, _Sources(_Forbidden()))
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^tokenizer.path: .* has 5 of the 6 sentinels"):
        tok_lib.load_or_train_tokenizer(_t5_config("tokenizer.extra_ids=6", f"tokenizer.path={tok.path}"),
                                        tmp_path / "run", _Sources(_Forbidden()))
    # More sentinels than the run uses are fine.
    fewer = _t5_config("tokenizer.extra_ids=3", f"tokenizer.path={tok.path}")
    loaded = tok_lib.load_or_train_tokenizer(fewer, tmp_path / "run", _Sources(_Forbidden()))
    assert loaded.sentinel_ids == tok.sentinel_ids


def test_the_vocab_floor_counts_the_sentinels():
    _config("model.arch=t5", "model.vocab_size=360")  # pad, unk, bos, eos, 100 sentinels, 256 bytes
    with pytest.raises(ConfigError, match=r"at least 360 .* 100 sentinels <extra_id_N>\) and byte fallback"):
        _config("model.arch=t5", "model.vocab_size=359")


def test_the_sample_of_a_seq2seq_corpus_holds_both_sides():
    pairs = [(f"question {i}", f"answer {i}") for i in range(50)]
    sample = tok_lib.sample_documents(pairs, sample_bytes=10_000)
    assert len(sample) == 50 and "question 7\nanswer 7" in sample


def test_piece_bytes_count_the_text_the_ids_stand_for(trained):
    """Bits per byte's denominator (scoring.bits_per_byte): the pieces' UTF-8 bytes, a word's leading
    space included, byte pieces one byte each (the é), control ids none."""
    tok, _ = trained
    sizes = tok.piece_bytes()
    text = "total = count(items) + 2 é"
    ids = tok.encode(text)
    assert int(sizes[ids].sum()) == len(text.encode("utf-8"))
    assert sizes[tok.bos_id] == sizes[tok.eos_id] == sizes[tok.pad_id] == 0
