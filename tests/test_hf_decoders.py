"""Hugging Face import/export of the decoder families (llm_jax/hf/convert.py, gpt2.py, llama.py).

Tiny transformers models are built from their configs with a fixed seed (weights drawn with a large
initializer_range, so the next-token distributions are peaked and greedy and beam choices are never
near ties), saved with save_pretrained beside a small byte-level BPE tokenizer (GPT-2's kind, trained
here with `tokenizers`), imported, run, exported back and loaded by transformers.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from llm_jax.config import ConfigError  # noqa: E402
from llm_jax.hf import convert, gpt2, llama  # noqa: E402
from llm_jax.hf.errors import HFConversionError  # noqa: E402
from llm_jax.infer import generate as gen  # noqa: E402
from llm_jax.infer.sampling import Sampling  # noqa: E402
from llm_jax.train import checkpoint as ckpt  # noqa: E402
from llm_jax.train import exported  # noqa: E402

torch.set_num_threads(1)

VOCAB = 320  # >= the 260 ids the config asks of a vocabulary (pad, unk, bos, eos and 256 bytes)
NEW_TOKENS = 32
SIZES = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None, initializer_range=0.3)


TEXT = "def add(a, b):\n    return a + b  # the sum of two numbers\n" * 20 + "class Point:\n    x: int = 0\n" * 20
SAMPLE = "def point(x, y):\n    return Point(x + y)  # ünïcode ✓\n"


def hf_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE of 300 ids (256 bytes, merges, <|endoftext|> as bos = eos = unk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def hf_model(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **SIZES))
    llama_sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, **SIZES)
    if family == "llama":  # a rope base other than the default, heads x head_dim above hidden_size
        return LlamaForCausalLM(LlamaConfig(rope_theta=500000.0, head_dim=16, **llama_sizes))
    return MistralForCausalLM(MistralConfig(sliding_window=None, tie_word_embeddings=True, **llama_sizes))


FAMILIES = ("gpt2", "llama", "mistral")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


def load_ours(path, overrides=()):
    """(setup, params) of an export, as generate reads it."""
    setup, params, _ = exported.restore_export(path, overrides, with_data=False)
    return setup, params


@pytest.fixture(scope="module")
def converted(work):
    """family -> (HF model, its folder, our export, (setup, params), the folder exported back)."""
    out = {}
    tokenizer = hf_tokenizer()
    for family in FAMILIES:
        model = hf_model(family).eval()
        hf_dir = work / family
        # llama: sharded, to read the index and several files
        model.save_pretrained(hf_dir, max_shard_size="20KB" if family == "llama" else "5GB")
        tokenizer.save_pretrained(hf_dir)
        ours = work / f"{family}_ours"
        convert.import_hf(hf_dir, ours)
        back = work / f"{family}_back"
        convert.export_hf(ours, back)
        out[family] = (model, hf_dir, ours, load_ours(ours), back)
    return out


def ids(batch=2, length=12, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_model_gives_transformers_logits(converted, family):
    model, _, ours, (setup, params), _ = converted[family]
    tokens = ids()
    logits = np.asarray(setup.model.apply({"params": params}, tokens))
    theirs = hf_logits(model, tokens)
    assert np.abs(theirs).max() > 1.0  # not a degenerate comparison
    assert np.abs(logits - theirs).max() <= 1e-4
    info = json.loads((ours / ckpt.EXPORT_INFO).read_text())
    assert info["source"] == "huggingface" and info["model_type"] == family


def test_sharded_folder_is_read(converted):
    _, hf_dir, *_ = converted["llama"]
    assert (hf_dir / "model.safetensors.index.json").is_file()
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_identical_and_loads_in_transformers(converted, family):
    model, _, _, _, back = converted[family]
    written = load_file(back / "model.safetensors")
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:  # save_pretrained leaves the tied copy out, as the export does
        original.pop("lm_head.weight")
    assert sorted(written) == sorted(original)
    for name, tensor in original.items():
        assert written[name].dtype == tensor.dtype and np.array_equal(written[name], tensor), name
    text_ids = AutoTokenizer.from_pretrained(back)(SAMPLE).input_ids
    assert text_ids == AutoTokenizer.from_pretrained(converted[family][1])(SAMPLE).input_ids
    assert text_ids == load_ours(converted[family][2])[0].tokenizer.encode(SAMPLE)
    reloaded = AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(reloaded).__name__ == {"gpt2": "GPT2LMHeadModel"}.get(family, "LlamaForCausalLM")
    tokens = ids(seed=1)
    assert np.abs(hf_logits(reloaded, tokens) - hf_logits(model, tokens)).max() <= 1e-5


def hf_generate(model, prompts, num_beams):
    tokens = torch.tensor(prompts)
    with torch.no_grad():
        out = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=num_beams, pad_token_id=0,
                             early_stopping=False, length_penalty=1.0)
    return out[:, tokens.shape[1]:].tolist()


@pytest.mark.parametrize("family", ("gpt2", "llama"))
@pytest.mark.parametrize("num_beams", (1, 4))
def test_generation_matches_transformers(converted, family, num_beams):
    """Greedy (num_beams 1) and beam search (4 beams) continue both prompts with transformers' tokens."""
    model, _, _, (setup, params), _ = converted[family]
    prompts = ids(length=8, seed=2).tolist()
    decoding = gen.Decoding(max_new_tokens=NEW_TOKENS, num_beams=num_beams, sampling=Sampling(temperature=0.0))
    with setup.context(split_batch=False):
        ours = gen.generate_batch(setup.model, params, prompts, decoding, rng=jax.random.key(0), batch_size=2)
    assert [g[0].tokens for g in ours] == hf_generate(model, prompts, num_beams)


def test_scanned_layers_export_as_unrolled(converted, work):
    """A run with model.scan_layers=true (its layers stacked) exports the same tensors."""
    _, _, ours, _, back = converted["llama"]
    setup, scanned = load_ours(ours, ["model.scan_layers=true"])
    assert "layers" in scanned and "layer_0" not in scanned
    ckpt.export_params(work / "scanned", scanned, setup.config, ours / "tokenizer", {"step": 0})
    convert.export_hf(work / "scanned", work / "scanned_back")
    flat, want = load_file(work / "scanned_back" / "model.safetensors"), load_file(back / "model.safetensors")
    assert flat.keys() == want.keys()
    assert all(np.array_equal(flat[name], want[name]) for name in want)


def test_bfloat16_import_exports_bfloat16(converted, work):
    import ml_dtypes

    _, hf_dir, *_ = converted["gpt2"]
    convert.import_hf(hf_dir, work / "bf16", dtype="bfloat16")
    convert.export_hf(work / "bf16", work / "bf16_back")
    written = load_file(work / "bf16_back" / "model.safetensors")
    original = load_file(hf_dir / "model.safetensors")
    name = "transformer.h.0.attn.c_attn.weight"
    assert written[name].dtype == ml_dtypes.bfloat16
    assert np.array_equal(written[name], original[name].astype(ml_dtypes.bfloat16))
    assert json.loads((work / "bf16_back" / "config.json").read_text())["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- refusals


def edited_copy(converted, work, name, family="llama", config_edit=None, drop=None):
    """A copy of a saved folder with config.json edited and/or a file removed."""
    import shutil

    _, hf_dir, *_ = converted[family]
    dest = work / name
    shutil.copytree(hf_dir, dest)
    if config_edit:
        config = json.loads((dest / "config.json").read_text())
        config.update(config_edit)
        (dest / "config.json").write_text(json.dumps(config))
    if drop:
        (dest / drop).unlink()
    return dest


@pytest.mark.parametrize("edit, words", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_parameters"),
    ({"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"model_type": "mistral", "sliding_window": 16}, "sliding_window=16"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "falcon"}, "model_type='falcon' is not supported"),
])
def test_config_without_faithful_mapping_is_refused_in_one_line(converted, work, edit, words):
    hf_dir = edited_copy(converted, work, f"refused_{abs(hash(words))}", config_edit=edit)
    with pytest.raises(HFConversionError, match=words) as error:
        convert.import_hf(hf_dir, work / f"refused_out_{abs(hash(words))}")
    assert "\n" not in str(error.value)
    assert not (work / f"refused_out_{abs(hash(words))}").exists()


def test_gpt2_fields_we_lack_are_refused():
    with pytest.raises(HFConversionError, match="scale_attn_by_inverse_layer_idx"):
        gpt2.model_keys_from_hf({"vocab_size": 8, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(HFConversionError, match="activation_function='quick_gelu'"):
        gpt2.model_keys_from_hf({"vocab_size": 8, "activation_function": "quick_gelu"})


def test_weights_problems_are_refused_in_one_line(converted, work):
    hf_dir = edited_copy(converted, work, "no_tensor", family="gpt2")
    state = load_file(hf_dir / "model.safetensors")
    state.pop("transformer.h.1.mlp.c_fc.bias")
    from safetensors.numpy import save_file

    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFConversionError, match="no tensor 'transformer.h.1.mlp.c_fc.bias'"):
        convert.import_hf(hf_dir, work / "no_tensor_out")

    torch_only = edited_copy(converted, work, "torch_only", family="gpt2", drop="model.safetensors")
    (torch_only / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HFConversionError, match="pytorch_model.bin.*safe_serialization=True"):
        convert.import_hf(torch_only, work / "torch_only_out")

    no_tokenizer = edited_copy(converted, work, "no_tokenizer", family="gpt2", drop="tokenizer.json")
    with pytest.raises(HFConversionError, match="holds no tokenizer"):
        convert.import_hf(no_tokenizer, work / "no_tokenizer_out")

    corrupt = edited_copy(converted, work, "corrupt", family="gpt2")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(HFConversionError, match="not a readable safetensors file"):
        convert.import_hf(corrupt, work / "corrupt_out")

    sharded = edited_copy(converted, work, "missing_shard", family="llama")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(HFConversionError, match=f"{shard.name} is missing"):
        convert.import_hf(sharded, work / "missing_shard_out")

    # More layers in config.json than in the weights: the first missing tensor is named.
    short = edited_copy(converted, work, "fewer_layers", family="gpt2", config_edit={"n_layer": 3})
    with pytest.raises(HFConversionError, match="no tensor 'transformer.h.2"):
        convert.import_hf(short, work / "fewer_layers_out")
    # Fewer: the tensors left over are refused, not dropped.
    extra = edited_copy(converted, work, "more_layers", family="gpt2", config_edit={"n_layer": 1})
    with pytest.raises(HFConversionError, match="transformer.h.1.* has no place"):
        convert.import_hf(extra, work / "more_layers_out")


def test_models_transformers_cannot_express_are_refused_at_export(converted, work):
    _, _, ours, (setup, _), _ = converted["gpt2"]
    model = setup.config.model
    import dataclasses

    with pytest.raises(HFConversionError, match="model.position=rope"):
        gpt2.hf_config_from_model(dataclasses.replace(model, position="rope"))
    with pytest.raises(HFConversionError, match="model.position=learned"):
        llama.hf_config_from_model(dataclasses.replace(model, arch="llama", position="learned"))
    with pytest.raises(ConfigError, match="not empty"):
        convert.export_hf(ours, ours)


def test_commands_print_one_json_line_or_fail_in_one_line(converted, work, capsys):
    from llm_jax import cli

    _, hf_dir, *_ = converted["gpt2"]
    assert cli.main(["hf", "import", str(hf_dir), str(work / "cli_import"), "--dtype", "float32"]) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["model_type"] == "gpt2" and summary["out"] == str(work / "cli_import")
    assert cli.main(["hf", "export", str(work / "cli_import"), str(work / "cli_export")]) == 0
    assert json.loads(capsys.readouterr().out.strip())["architecture"] == "GPT2LMHeadModel"
    assert cli.main(["hf", "import", str(work), str(work / "cli_nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm-jax hf: error:") and "no config.json" in err and "\n" not in err


@pytest.mark.parametrize("module, keys", [
    (gpt2, dict(arch="gpt2", tie_embeddings=False)),
    (llama, dict(arch="llama", tie_embeddings=True, n_kv_heads=1, head_dim=12)),
])
def test_mapping_round_trips_variants_the_models_above_do_not_cover(module, keys):
    """Our tree -> HF tensors -> our tree is the identity (an untied gpt2, a tied llama, one kv head)."""
    import flax.linen as nn

    from llm_jax.config import ModelConfig
    from llm_jax.models.build import make_model

    model = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=48, max_len=16, **keys)
    abstract = jax.eval_shape(lambda: make_model(model).init(jax.random.key(0), np.zeros((1, 4), np.int32)))
    draws = np.random.default_rng(0)
    params = jax.tree.map(lambda a: draws.standard_normal(a.shape).astype(np.float32),
                          nn.unbox(abstract)["params"])
    params = convert.host_tree(params)
    tensors = dict(module.params_to_hf(model, params))
    assert ("lm_head.weight" in tensors) != model.resolved_tie_embeddings
    back = module.params_from_hf(model, tensors.__getitem__, set(tensors))
    convert.check_tree(model, back, "test")
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))


def test_imported_llama_fine_tunes_with_init_from_and_exports_back(converted, work):
    """Import -> a few training steps with init_from= (from the import's own config.yaml) -> hf export ->
    transformers loads the fine-tuned model and its tokenizer, and computes the run's logits."""
    from llm_jax.config import load_config
    from llm_jax.train import loop

    model, hf_dir, ours, _, _ = converted["llama"]
    corpus = work / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(TEXT[i * 40:] + "\n")
    config = load_config(ours / ckpt.EXPORT_CONFIG, [
        f"workdir={work / 'tuned'}", f"init_from={ours}", "data.source=text", f"data.path={corpus}/*.txt",
        f"data.prepared_dir={work / 'prepared'}", "train.steps=2", "train.batch_size=2", "train.seq_len=16",
        "train.eval_every=2", "train.eval_batches=1", "train.log_every=1", "checkpoint.every=2",
        "train.progress=false", "train.sample_tokens=2", "optimizer.warmup_steps=1", "optimizer.lr=1e-2"])
    loop.train(config)
    convert.export_hf(work / "tuned", work / "tuned_hf")
    tuned = AutoModelForCausalLM.from_pretrained(work / "tuned_hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(work / "tuned_hf")
    assert tokenizer(SAMPLE).input_ids == AutoTokenizer.from_pretrained(hf_dir)(SAMPLE).input_ids
    # generate stops where llm-jax generate does: the tokenizer's eos, in generation_config.json
    assert tuned.generation_config.eos_token_id == tokenizer.eos_token_id == tokenizer.bos_token_id is not None
    before = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(tuned.state_dict()["model.layers.0.mlp.up_proj.weight"], before)  # it trained
    setup, params, step = loop.restore_for_inference(work / "tuned", with_data=False)
    assert step == 2
    tokens = ids(seed=3)
    logits = np.asarray(setup.model.apply({"params": params}, tokens))
    assert np.abs(logits - hf_logits(tuned, tokens)).max() <= 1e-4


def test_int8_export_is_refused_in_one_line(converted, work):
    import shutil

    _, _, ours, _, _ = converted["gpt2"]
    int8 = work / "int8"
    shutil.copytree(ours, int8)
    info = json.loads((int8 / ckpt.EXPORT_INFO).read_text())
    (int8 / ckpt.EXPORT_INFO).write_text(json.dumps({**info, "quantization": {"format": "int8"}}))
    with pytest.raises(HFConversionError, match="holds int8 weights") as error:
        convert.export_hf(int8, work / "int8_hf")
    assert "\n" not in str(error.value) and not (work / "int8_hf").exists()
