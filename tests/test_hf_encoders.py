"""Hugging Face import/export of the encoder (bert) and encoder-decoder (t5) families (llm_jax/hf/bert.py,
t5.py) against transformers' own models, built from tiny configs and saved with save_pretrained: the
config.json and model.safetensors that transformers writes are imported, and what we export is loaded back
by `from_pretrained`. Float32 on CPU; logits within 1e-4, weights bit for bit, decoding token for token.
Every weight is perturbed first, so that a norm scale left at 1 or a bias at 0 cannot hide a mis-mapping."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from llm_jax.config import ModelConfig
from llm_jax.hf import bert, t5
from llm_jax.hf.errors import HFConversionError
from llm_jax.infer.generate import Decoding, generate_batch
from llm_jax.infer.sampling import Sampling
from llm_jax.models.build import make_model

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")

EOS = 1  # T5's
BERT_SIZES = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=32)
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
T5_SIZES = dict(vocab_size=160, d_model=32, d_ff=64, num_heads=4, decoder_start_token_id=0,
                eos_token_id=EOS, pad_token_id=0)


def perturbed(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def saved(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


def read_folder(path) -> tuple[dict, dict[str, np.ndarray]]:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f), load_file(os.path.join(path, "model.safetensors"))


def import_folder(module, path) -> tuple[ModelConfig, dict]:
    hf, tensors = read_folder(path)
    config = ModelConfig(**module.model_keys_from_hf(hf))
    return config, module.params_from_hf(config, tensors.__getitem__, tensors.keys())


def export_folder(module, config: ModelConfig, params: dict, path) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(module.hf_config_from_model(config), f)
    save_file(dict(module.params_to_hf(config, params)), os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    return str(path)


def ours(config: ModelConfig, params: dict, *args, output: str = "logits", **kwargs) -> np.ndarray:
    """Our model's output, jitted (one compile is cheaper than dispatching every op)."""
    model = make_model(config)
    if config.family.encoder:
        kwargs["output"] = output
    return np.asarray(jax.jit(lambda p, *a, **k: model.apply({"params": p}, *a, **k), static_argnames=("output",))(
        params, *args, **kwargs))


def assert_same_tensors(path_a, path_b, extra: set[str] = frozenset(), unread: set[str] = frozenset()):
    """Every tensor of folder a in folder b, bit for bit (but `unread`: tensors transformers never reads);
    b holds only those and `extra`."""
    _, a = read_folder(path_a)
    _, b = read_folder(path_b)
    assert set(b) == set(a) | extra
    for name, x in a.items():
        if name in unread:
            continue
        assert b[name].dtype == x.dtype and np.array_equal(b[name], x), name


# ----------------------------------------------------------------------------- bert

TOKENS = np.random.default_rng(0).integers(4, 128, (2, 24))
TOKEN_TYPES = np.asarray([[0] * 14 + [1] * 10] * 2)


@pytest.fixture(scope="module", params=["tied", "untied"])
def bert_mlm(request, tmp_path_factory):
    config = transformers.BertConfig(**BERT_SIZES, tie_word_embeddings=request.param == "tied")
    model = perturbed(transformers.BertForMaskedLM(config), seed=1)
    return model, saved(model, tmp_path_factory.mktemp(f"bert_{request.param}"))


def bert_logits(model, tokens=TOKENS, token_types=TOKEN_TYPES) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(token_types)).logits.numpy()


def test_bert_import_matches_transformers(bert_mlm, caplog):
    model, path = bert_mlm
    with caplog.at_level("WARNING"):
        config, params = import_folder(bert, path)
    # BertForMaskedLM has no pooler: ours starts as transformers would start it, and says so.
    assert "pooler" in caplog.text and "mlm_head" not in caplog.text
    got = ours(config, params, jnp.asarray(TOKENS), token_types=jnp.asarray(TOKEN_TYPES))
    np.testing.assert_allclose(got, bert_logits(model), atol=1e-4, rtol=0)


def test_bert_export_loads_in_transformers_bit_identical(bert_mlm, tmp_path):
    model, path = bert_mlm
    config, params = import_folder(bert, path)
    out = export_folder(bert, config, params, tmp_path / "out")
    pooler = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    # Untied, transformers' decoder adds its own bias (cls.predictions.decoder.bias, ours); the other
    # one, cls.predictions.bias, is then never read, and we write ours there too.
    untied = not model.config.tie_word_embeddings
    assert_same_tensors(path, out, extra=pooler, unread={"cls.predictions.bias"} if untied else set())
    loaded, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and info["unexpected_keys"] <= pooler
    np.testing.assert_array_equal(bert_logits(loaded.eval()), bert_logits(model))
    # The pooler travels too: BertModel reads it, and its sentence vector is ours.
    base = transformers.AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        pooled = base(input_ids=torch.tensor(TOKENS), token_type_ids=torch.tensor(TOKEN_TYPES)).pooler_output
    got = ours(config, params, jnp.asarray(TOKENS), token_types=jnp.asarray(TOKEN_TYPES), output="pooled")
    np.testing.assert_allclose(got, pooled.numpy(), atol=1e-4, rtol=0)


def test_bert_model_checkpoint_gets_transformers_mlm_head_init(tmp_path, caplog):
    """A BertModel file: no "bert." prefix, a pooler, no masked-LM head (initialised as transformers does)."""
    model = perturbed(transformers.BertModel(transformers.BertConfig(**BERT_SIZES)), seed=2)
    with caplog.at_level("WARNING"):
        config, params = import_folder(bert, saved(model, tmp_path))
    assert "mlm_head" in caplog.text and "pooler" not in caplog.text
    head = params["mlm_head"]
    assert (head["transform_norm"]["scale"] == 1).all() and not head["transform_norm"]["bias"].any()
    assert not head["bias"].any() and not head["transform"]["bias"].any()
    assert 0.01 < head["transform"]["kernel"].std() < 0.03  # normal(initializer_range 0.02)
    with torch.no_grad():
        pooled = model(input_ids=torch.tensor(TOKENS), token_type_ids=torch.tensor(TOKEN_TYPES)).pooler_output
    got = ours(config, params, jnp.asarray(TOKENS), token_types=jnp.asarray(TOKEN_TYPES), output="pooled")
    np.testing.assert_allclose(got, pooled.numpy(), atol=1e-4, rtol=0)


def test_bert_reads_the_old_layernorm_names(bert_mlm):
    """Older BERT files name LayerNorm parameters gamma/beta, which transformers renames on load."""
    hf, tensors = read_folder(bert_mlm[1])
    old = {n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): x
           for n, x in tensors.items()}
    assert old.keys() != tensors.keys()
    config = ModelConfig(**bert.model_keys_from_hf(hf))
    got = bert.params_from_hf(config, old.__getitem__, old.keys())
    jax.tree.map(np.testing.assert_array_equal, got, bert.params_from_hf(config, tensors.__getitem__, tensors.keys()))


# ----------------------------------------------------------------------------- t5

ENCODER_TOKENS = np.random.default_rng(1).integers(2, 160, (2, 20))
ENCODER_REAL = np.ones((2, 20), np.int64)
ENCODER_REAL[1, 13:] = 0  # the second row is padded
TARGETS = np.random.default_rng(2).integers(2, 160, (2, 12))
DECODER_INPUTS = np.concatenate([np.zeros((2, 1), np.int64), TARGETS[:, :-1]], axis=1)  # shifted right, start 0


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """variant -> (transformers' model, the folder it saved), each built once."""
    built = {}

    def build(variant: str):
        if variant not in built:
            config_class, model_class = ((transformers.MT5Config, transformers.MT5ForConditionalGeneration)
                                         if variant == "mt5" else
                                         (transformers.T5Config, transformers.T5ForConditionalGeneration))
            model = model_class(config_class(**T5_SIZES, **T5_VARIANTS[variant]))
            if not T5_VARIANTS[variant]["tie_word_embeddings"]:  # transformers 5 builds lm_head tied
                model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 32**-0.5)
            model = perturbed(model, seed=3)
            built[variant] = model, saved(model, tmp_path_factory.mktemp(f"t5_{variant}"))
        return built[variant]

    return build


def t5_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ENCODER_TOKENS * ENCODER_REAL), attention_mask=torch.tensor(ENCODER_REAL),
                     decoder_input_ids=torch.tensor(DECODER_INPUTS)).logits.numpy()


def our_t5_logits(config, params) -> np.ndarray:
    return ours(config, params, jnp.asarray(DECODER_INPUTS), encoder_tokens=jnp.asarray(ENCODER_TOKENS * ENCODER_REAL),
                encoder_segment_ids=jnp.asarray(ENCODER_REAL))


@pytest.mark.parametrize("variant", T5_VARIANTS)
def test_t5_import_matches_transformers(t5_folder, variant):
    model, path = t5_folder(variant)
    config, params = import_folder(t5, path)
    assert config.resolved_tie_embeddings == (variant == "original")
    assert (config.resolved_head_dim * config.n_heads != config.d_model) == (variant != "original")
    np.testing.assert_allclose(our_t5_logits(config, params), t5_logits(model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["v1.1", "original"])
def test_t5_export_loads_in_transformers_bit_identical(t5_folder, variant, tmp_path):
    model, path = t5_folder(variant)
    config, params = import_folder(t5, path)
    out = export_folder(t5, config, params, tmp_path / "out")
    assert_same_tensors(path, out)
    loaded, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    np.testing.assert_array_equal(t5_logits(loaded.eval()), t5_logits(model))


def test_t5_greedy_and_beam_search_match_transformers(t5_folder):
    """32 new tokens greedily (eos held off, as min_new_tokens does in both), then 4 beams, on two prompts
    of different lengths (the shorter padded); T5 v1.1, whose heads are not d_model / n_heads wide."""
    model, path = t5_folder("v1.1")
    config, params = import_folder(t5, path)
    prompts = [list(ENCODER_TOKENS[0]), list(ENCODER_TOKENS[1, :13])]
    jparams = jax.tree.map(jnp.asarray, params)

    def hf_generate(**kwargs):
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor(ENCODER_TOKENS * ENCODER_REAL),
                                 attention_mask=torch.tensor(ENCODER_REAL), do_sample=False, **kwargs)
        return [[t for t in row[1:] if t != 0] for row in out.tolist()]  # drop the start id and HF's padding

    greedy = generate_batch(make_model(config), jparams, prompts, Decoding(max_new_tokens=32, min_new_tokens=32,
                                                                                 sampling=Sampling(temperature=0.0)),
                            rng=jax.random.key(0), eos_id=EOS)
    assert [g.tokens for [g] in greedy] == hf_generate(max_new_tokens=32, min_new_tokens=32)
    beams = generate_batch(make_model(config), jparams, prompts,
                           Decoding(max_new_tokens=12, num_beams=4, num_return_sequences=4),
                           rng=jax.random.key(0), eos_id=EOS)
    expected = hf_generate(max_new_tokens=12, num_beams=4, num_return_sequences=4)
    assert [g.tokens for gens in beams for g in gens] == expected


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("module, change, field", [
    (bert, {"position_embedding_type": "relative_key"}, "position_embedding_type"),
    (bert, {"hidden_act": "mish"}, "hidden_act"),
    (bert, {"is_decoder": True}, "is_decoder"),
    (bert, {"type_vocab_size": 1}, "type_vocab_size"),
    (t5, {"model_type": "umt5"}, "umt5"),
    (t5, {"feed_forward_proj": "gated-mish"}, "feed_forward_proj"),
    (t5, {"decoder_start_token_id": 2}, "decoder_start_token_id"),
])
def test_config_without_faithful_mapping_is_refused_in_one_line(module, change, field):
    hf = {**(BERT_SIZES if module is bert else T5_SIZES), **change}
    with pytest.raises(HFConversionError, match=field) as error:
        module.model_keys_from_hf(hf)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("module, keys, field", [
    (bert, dict(arch="bert", position="sinusoidal"), "model.position"),
    (bert, dict(arch="bert", n_kv_heads=2), "model.n_kv_heads"),
    (t5, dict(arch="t5", activation="gelu"), "model.activation"),
])
def test_model_without_hf_equivalent_is_refused_in_one_line(module, keys, field):
    with pytest.raises(HFConversionError, match=field) as error:
        module.hf_config_from_model(ModelConfig(d_model=32, n_heads=4, **keys))
    assert "\n" not in str(error.value)


def test_mt5_without_its_own_lm_head_is_refused(t5_folder):
    """MT5ForConditionalGeneration never scales the decoder output: tied to the embedding, it is not ours."""
    hf, tensors = read_folder(t5_folder("mt5")[1])
    del tensors["lm_head.weight"]
    config = ModelConfig(**t5.model_keys_from_hf(hf))
    with pytest.raises(HFConversionError, match="lm_head.weight is missing"):
        t5.params_from_hf(config, tensors.__getitem__, tensors.keys())


def test_t5_scaled_output_with_its_own_lm_head_is_refused(t5_folder):
    """A checkpoint that scales the decoder output (tied) yet holds an lm_head that is not the embedding."""
    hf, tensors = read_folder(t5_folder("original")[1])
    tensors["lm_head.weight"] = tensors["shared.weight"] * 2
    config = ModelConfig(**t5.model_keys_from_hf(hf))
    with pytest.raises(HFConversionError, match="scale_decoder_outputs"):
        t5.params_from_hf(config, tensors.__getitem__, tensors.keys())
