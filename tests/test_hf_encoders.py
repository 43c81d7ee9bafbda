"""Hugging Face import/export of the encoder (bert) and encoder-decoder (t5) families (llm_jax/hf/bert.py,
t5.py, through hf/convert.py's import_hf and export_hf).

transformers' own models are built from tiny configs, every weight perturbed (so that a norm scale left
at 1 or a bias at 0 cannot hide a mis-mapping), saved with save_pretrained beside a tokenizer trained
here (BERT's WordPiece; T5's SentencePiece unigram with transformers' 100 sentinels), imported, run,
exported back and loaded by transformers' Auto classes. Float32 on CPU: logits within 1e-4, weights bit
for bit, decoding token for token.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from llm_jax.config import ModelConfig  # noqa: E402
from llm_jax.data.corpus import default_corpus_root, list_default_files  # noqa: E402
from llm_jax.hf import bert, convert, t5  # noqa: E402
from llm_jax.hf.errors import HFConversionError  # noqa: E402
from llm_jax.infer.generate import Decoding, generate_batch  # noqa: E402
from llm_jax.infer.sampling import Sampling  # noqa: E402
from llm_jax.models.build import make_model  # noqa: E402
from llm_jax.train import checkpoint as ckpt  # noqa: E402
from llm_jax.train import exported  # noqa: E402

torch.set_num_threads(1)

SAMPLE = "The quick brown fox jumps over the lazy dog, and then it runs home to sleep. Ünïcode ✓"
BERT_VOCAB, T5_VOCAB = 320, 416  # >= the tokenizers' 300 and 400 ids, and what the imported config asks
BERT_SIZES = dict(vocab_size=BERT_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=32)
T5_SIZES = dict(vocab_size=T5_VOCAB, d_model=32, d_ff=64, num_heads=4, decoder_start_token_id=0, eos_token_id=1,
                pad_token_id=0)
# v1.1: gated GELU, untied lm_head, 4 heads x d_kv 16 = 64 against d_model 32, unequal stack depths (the
# deeper one the encoder: transformers 5 sizes its generation cache by num_layers); mt5: the same network in
# its own class (never scaled); original: relu, tied and scaled output, few buckets with a short max distance
# (so some distances share one).
T5_VARIANTS = {
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=16, num_layers=3,
                 num_decoder_layers=2),
    "mt5": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=16, num_layers=2),
    "original": dict(feed_forward_proj="relu", tie_word_embeddings=True, d_kv=8, num_layers=2,
                     relative_attention_num_buckets=8, relative_attention_max_distance=12),
}
VARIANTS = ("bert", "bert_untied", *T5_VARIANTS)


def perturbed(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_model(variant: str):
    if variant.startswith("bert"):
        config = transformers.BertConfig(**BERT_SIZES, tie_word_embeddings=variant == "bert")
        return perturbed(transformers.BertForMaskedLM(config), seed=1)
    mt5 = variant == "mt5"
    config = (transformers.MT5Config if mt5 else transformers.T5Config)(**T5_SIZES, **T5_VARIANTS[variant])
    model = (transformers.MT5ForConditionalGeneration if mt5 else transformers.T5ForConditionalGeneration)(config)
    if not T5_VARIANTS[variant]["tie_word_embeddings"]:  # transformers 5 builds lm_head tied to the embedding
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 32**-0.5)
    return perturbed(model, seed=3)


def save_tokenizer(texts, variant: str, folder, extra_ids: int = 100) -> None:
    if variant.startswith("bert"):
        wordpiece = tokenizers.implementations.BertWordPieceTokenizer(lowercase=True)
        wordpiece.train_from_iterator(texts, vocab_size=300)
        transformers.BertTokenizer(tokenizer_object=wordpiece._tokenizer).save_pretrained(folder)
        return
    # As T5 ships it: spiece.model (unigram, pad 0 eos 1 unk 2, no bos), sentinels added by transformers.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(folder / "spiece"), vocab_size=300,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (folder / "spiece.vocab").unlink()
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """variant -> (transformers' model, its folder, our import, (setup, params) of it, the folder exported back)."""
    work = tmp_path_factory.mktemp("hf")
    texts = [f.read_text(errors="ignore")[:4000] for f in list_default_files(default_corpus_root())[:10]]
    built = {}

    def get(variant: str):
        if variant not in built:
            model, hf_dir = hf_model(variant), work / variant
            model.save_pretrained(hf_dir)
            save_tokenizer(texts, variant, hf_dir)
            convert.import_hf(hf_dir, work / f"{variant}_ours")
            convert.export_hf(work / f"{variant}_ours", work / f"{variant}_back")
            setup, params, _ = exported.restore_export(work / f"{variant}_ours", with_data=False)
            built[variant] = model, hf_dir, work / f"{variant}_ours", (setup, params), work / f"{variant}_back"
        return built[variant]

    return get


# Two rows: BERT's with both token types; T5's second row padded on the encoder side.
TOKENS = np.random.default_rng(0).integers(5, 300, (2, 24))
TOKEN_TYPES = np.asarray([[0] * 14 + [1] * 10] * 2)
ENCODER_REAL = np.ones((2, 20), np.int64)
ENCODER_REAL[1, 13:] = 0
ENCODER_TOKENS = np.random.default_rng(1).integers(3, 300, (2, 20)) * ENCODER_REAL
TARGETS = np.random.default_rng(2).integers(3, 300, (2, 12))
DECODER_INPUTS = np.concatenate([np.zeros((2, 1), np.int64), TARGETS[:, :-1]], axis=1)  # shifted right, start 0


def theirs(model, output: str = "logits") -> np.ndarray:
    with torch.no_grad():
        if isinstance(model, transformers.BertPreTrainedModel):
            out = model(input_ids=torch.tensor(TOKENS), token_type_ids=torch.tensor(TOKEN_TYPES))
            return (out.pooler_output if output == "pooled" else out.logits).numpy()
        return model(input_ids=torch.tensor(ENCODER_TOKENS), attention_mask=torch.tensor(ENCODER_REAL),
                     decoder_input_ids=torch.tensor(DECODER_INPUTS)).logits.numpy()


def ours(config: ModelConfig, params, output: str = "logits") -> np.ndarray:
    """Our model's output on the same tokens, jitted (one compile is cheaper than dispatching every op)."""
    model = make_model(config)
    if config.family.encoder:
        fn = jax.jit(lambda p: model.apply({"params": p}, TOKENS, token_types=TOKEN_TYPES, output=output))
    else:
        fn = jax.jit(lambda p: model.apply({"params": p}, DECODER_INPUTS, encoder_tokens=ENCODER_TOKENS,
                                           encoder_segment_ids=ENCODER_REAL))
    return np.asarray(fn(jax.tree.map(jnp.asarray, params)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_model_gives_transformers_logits(converted, variant):
    model, _, _, (setup, params), _ = converted(variant)
    config = setup.config.model
    assert config.resolved_tie_embeddings == (variant in ("bert", "original"))
    assert (config.resolved_head_dim * config.n_heads != config.d_model) == (variant in ("v1.1", "mt5"))
    expected = theirs(model)
    assert np.abs(expected).max() > 1.0  # not a degenerate comparison
    np.testing.assert_allclose(ours(config, params), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_bit_identical_and_loads_in_transformers(converted, variant):
    model, hf_dir, ours_dir, (setup, params), back = converted(variant)
    original, written = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    extra, unread = set(), set()
    if variant.startswith("bert"):
        # BertForMaskedLM has no pooler: the import starts one as transformers would, the export writes it.
        extra = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
        if variant == "bert_untied":
            # Untied, transformers adds the decoder's own bias (ours); cls.predictions.bias is never read.
            unread = {"cls.predictions.bias"}
    assert set(written) == set(original) | extra
    for name, tensor in original.items():
        if name not in unread:
            assert written[name].dtype == tensor.dtype and np.array_equal(written[name], tensor), name

    auto = transformers.AutoModelForMaskedLM if variant.startswith("bert") else transformers.AutoModelForSeq2SeqLM
    reloaded, info = auto.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and info["unexpected_keys"] <= extra
    assert type(reloaded).__name__ == (bert.ARCHITECTURE if variant.startswith("bert") else t5.ARCHITECTURE)
    np.testing.assert_allclose(theirs(reloaded.eval()), theirs(model), atol=1e-5 if variant == "mt5" else 0, rtol=0)
    if variant.startswith("bert"):  # BertModel reads the pooler, and its sentence vector is ours
        pooled = theirs(transformers.AutoModel.from_pretrained(back).eval(), "pooled")
        np.testing.assert_allclose(ours(setup.config.model, params, "pooled"), pooled, atol=1e-4, rtol=0)

    ids = transformers.AutoTokenizer.from_pretrained(back)(SAMPLE, add_special_tokens=False).input_ids
    assert ids == transformers.AutoTokenizer.from_pretrained(hf_dir)(SAMPLE, add_special_tokens=False).input_ids
    assert ids == setup.tokenizer.encode(SAMPLE)


def test_t5_greedy_and_beam_search_match_transformers(converted):
    """32 new tokens greedily (eos held off by min_new_tokens in both), then 4 beams, on two prompts of
    different lengths (the shorter padded); T5 v1.1, whose heads are not d_model / n_heads wide."""
    model, _, _, (setup, params), _ = converted("v1.1")
    prompts = [list(ENCODER_TOKENS[0]), list(ENCODER_TOKENS[1, :13])]
    eos = setup.tokenizer.eos_id
    assert eos == model.config.eos_token_id == 1

    def hf_generate(**kwargs):
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor(ENCODER_TOKENS), attention_mask=torch.tensor(ENCODER_REAL),
                                 do_sample=False, **kwargs)
        return [[t for t in row[1:] if t != 0] for row in out.tolist()]  # the start id and padding dropped

    def generate(decoding):
        with setup.context(split_batch=False):
            return generate_batch(setup.model, params, prompts, decoding, rng=jax.random.key(0), eos_id=eos)

    greedy = generate(Decoding(max_new_tokens=32, min_new_tokens=32, sampling=Sampling(temperature=0.0)))
    assert [g.tokens for [g] in greedy] == hf_generate(max_new_tokens=32, min_new_tokens=32)
    beams = generate(Decoding(max_new_tokens=12, num_beams=4, num_return_sequences=4))
    assert [g.tokens for gens in beams for g in gens] == hf_generate(max_new_tokens=12, num_beams=4,
                                                                     num_return_sequences=4)


def test_t5_scanned_stacks_export_as_unrolled(converted, tmp_path):
    """A t5 run with model.scan_layers=true (each stack's layers stacked) exports the same tensors."""
    _, _, ours_dir, _, back = converted("v1.1")
    setup, scanned, _ = exported.restore_export(ours_dir, ["model.scan_layers=true"], with_data=False)
    assert "layers" in scanned["encoder"] and "layers" in scanned["decoder"]
    ckpt.export_params(tmp_path / "scanned", scanned, setup.config, ours_dir / "tokenizer", {"step": 0})
    convert.export_hf(tmp_path / "scanned", tmp_path / "scanned_back")
    flat, want = load_file(tmp_path / "scanned_back" / "model.safetensors"), load_file(back / "model.safetensors")
    assert flat.keys() == want.keys()
    assert all(np.array_equal(flat[name], want[name]) for name in want)


# ----------------------------------------------------------------------------- checkpoints of other forms


def read_folder(path) -> tuple[dict, dict[str, np.ndarray]]:
    return json.loads((path / "config.json").read_text()), load_file(path / "model.safetensors")


def test_bert_model_checkpoint_gets_transformers_mlm_head_init(tmp_path, caplog):
    """A BertModel file: no "bert." prefix, a pooler, no masked-LM head (initialised as transformers does)."""
    model = perturbed(transformers.BertModel(transformers.BertConfig(**BERT_SIZES)), seed=2)
    model.save_pretrained(tmp_path)
    hf, tensors = read_folder(tmp_path)
    config = ModelConfig(**bert.model_keys_from_hf(hf))
    with caplog.at_level("WARNING"):
        params = bert.params_from_hf(config, tensors.__getitem__, tensors.keys())
    assert "mlm_head" in caplog.text and "pooler" not in caplog.text
    head = params["mlm_head"]
    assert (head["transform_norm"]["scale"] == 1).all() and not head["transform_norm"]["bias"].any()
    assert not head["bias"].any() and not head["transform"]["bias"].any()
    assert 0.01 < head["transform"]["kernel"].std() < 0.03  # normal(initializer_range 0.02)
    np.testing.assert_allclose(ours(config, params, "pooled"), theirs(model, "pooled"), atol=1e-4, rtol=0)


def test_bert_reads_the_old_layernorm_names(converted):
    """Older BERT files name LayerNorm parameters gamma/beta, which transformers renames on load."""
    hf, tensors = read_folder(converted("bert")[1])
    old = {n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): x
           for n, x in tensors.items()}
    assert old.keys() != tensors.keys()
    config = ModelConfig(**bert.model_keys_from_hf(hf))
    got = bert.params_from_hf(config, old.__getitem__, old.keys())
    jax.tree.map(np.testing.assert_array_equal, got, bert.params_from_hf(config, tensors.__getitem__, tensors.keys()))


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("module, change, field", [
    (bert, {"position_embedding_type": "relative_key"}, "position_embedding_type"),
    (bert, {"hidden_act": "mish"}, "hidden_act"),
    (bert, {"is_decoder": True}, "is_decoder"),
    (bert, {"type_vocab_size": 1}, "type_vocab_size"),
    (t5, {"model_type": "umt5"}, "umt5"),
    (t5, {"feed_forward_proj": "gated-mish"}, "feed_forward_proj"),
    (t5, {"feed_forward_proj": "gated-gelu", "dense_act_fn": "mish"}, "dense_act_fn"),
    (t5, {"decoder_start_token_id": 2}, "decoder_start_token_id"),
])
def test_config_without_faithful_mapping_is_refused_in_one_line(module, change, field):
    hf = {**(BERT_SIZES if module is bert else T5_SIZES), **change}
    with pytest.raises(HFConversionError, match=field) as error:
        module.model_keys_from_hf(hf)
    assert "\n" not in str(error.value)


def test_t5_activation_is_read_as_transformers_reads_it():
    """feed_forward_proj, unless the dense_act_fn / is_gated_act that transformers 5 also saves say otherwise."""
    def read(**hf):
        keys = t5.model_keys_from_hf({**T5_SIZES, **hf})
        return keys["activation"], keys["gated_mlp"]

    assert read(feed_forward_proj="gated-gelu") == ("gelu_tanh", True)
    assert read(feed_forward_proj="relu") == ("relu", False)
    assert read(feed_forward_proj="gated-gelu", dense_act_fn="relu", is_gated_act=False) == ("relu", False)


@pytest.mark.parametrize("module, keys, field", [
    (bert, dict(arch="bert", position="sinusoidal"), "model.position"),
    (bert, dict(arch="bert", n_kv_heads=2), "model.n_kv_heads"),
    (t5, dict(arch="t5", activation="gelu"), "model.activation"),
])
def test_model_without_hf_equivalent_is_refused_in_one_line(module, keys, field):
    with pytest.raises(HFConversionError, match=field) as error:
        module.hf_config_from_model(ModelConfig(d_model=32, n_heads=4, **keys))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("variant, edit, words", [
    # MT5ForConditionalGeneration never scales the decoder output: tied to the embedding, it is not ours.
    ("mt5", lambda w: w.pop("lm_head.weight"), "lm_head.weight is missing"),
    # Scaled (tied) yet with an lm_head of its own, which transformers would not tie.
    ("original", lambda w: w.update({"lm_head.weight": w["shared.weight"] * 2}), "scale_decoder_outputs"),
    # An encoder embedding of its own: transformers would not tie it either.
    ("original", lambda w: w.update({"encoder.embed_tokens.weight": w["shared.weight"] * 2}), "one embedding"),
])
def test_t5_weights_that_are_not_one_tied_model_are_refused(converted, variant, edit, words):
    hf, tensors = read_folder(converted(variant)[1])
    edit(tensors)
    config = ModelConfig(**t5.model_keys_from_hf(hf))
    with pytest.raises(HFConversionError, match=words):
        t5.params_from_hf(config, tensors.__getitem__, tensors.keys())


def test_a_t5_tokenizer_with_other_than_100_sentinels_imports_with_its_count(tmp_path):
    texts = [f.read_text(errors="ignore")[:4000] for f in list_default_files(default_corpus_root())[:10]]
    hf_model("v1.1").save_pretrained(tmp_path / "hf")
    save_tokenizer(texts, "v1.1", tmp_path / "hf", extra_ids=20)
    convert.import_hf(tmp_path / "hf", tmp_path / "ours")
    setup, _, _ = exported.restore_export(tmp_path / "ours", with_data=False)
    assert setup.config.tokenizer.extra_ids == 20
    assert len(setup.tokenizer.sentinel_ids) == 20
