"""T5 <-> Hugging Face's T5ForConditionalGeneration (model_type "t5", and "mt5"): config.json and tensor names.

The parameter tree mirrors T5ForConditionalGeneration one for one (the table in models/encdec.py's
docstring), so the mapping is names and axes: torch Linear weights are [out, in], q/k/v [H*D, E] and
o [E, H*D]; embeddings and the relative bias tables [buckets, heads] are not transposed. d_kv is
model.head_dim, which may differ from d_model / num_heads (t5-v1_1-small: 6 x 64 against 512).

Output projection. Ours: tied -> the embedding, fed x * d_model**-0.5 (the original T5); untied ->
lm_head, unscaled (T5 v1.1, mT5). transformers 5 keeps tying and scaling apart: its T5Config always
says tie_word_embeddings=true and reads the scale from `scale_decoder_outputs` (from the
tie_word_embeddings of older config.json files when that is absent), while lm_head stays its own
tensor whenever the file holds one that differs from shared.weight. So on import the scale says
which of ours it is (`scale_decoder_outputs`, else `tie_word_embeddings`, default true; mT5 never
scales); an lm_head.weight in a scaled checkpoint that is not shared.weight has no equivalent and is
refused. Export writes both keys (tied and scaled, or neither) and lm_head.weight only when untied.

Decoding starts from id 0 in llm_jax (infer/generate.DECODER_START_ID, the pad id, as T5 does), so
a config whose decoder_start_token_id is another id is refused. umt5 (a relative bias table in every
layer, not one per stack) is recognised only to be refused with that reason.

The embedding is shared.weight; copies of it in the file (encoder/decoder.embed_tokens, lm_head when
tied) must equal it, or transformers would not tie them and the model would not be ours. Not a weight,
so ignored: the cross-attention relative bias of old checkpoints, which transformers ignores too. Dropout
rates are training settings: the import sets model.dropout=0 and the export writes 0.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.data.tokenizer import EOS_ID, PAD_ID
from llm_jax.hf.errors import HFConversionError
from llm_jax.hf.gpt2 import ACTIVATIONS as ACTIVATIONS_FROM_HF  # transformers' ACT2FN names -> ours
from llm_jax.infer.generate import DECODER_START_ID

MODEL_TYPES = ("t5", "mt5", "umt5")
ARCHITECTURE = "T5ForConditionalGeneration"
# Tensors that are not our weights (convert.py checks every other one is used).
IGNORED_SUFFIXES = ("EncDecAttention.relative_attention_bias.weight",)
_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

# T5Config's and MT5Config's defaults (transformers 5): what a config.json without the key means.
_T5_DEFAULTS = {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
                "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu"}
_DEFAULTS = {"t5": _T5_DEFAULTS,
             "mt5": {**_T5_DEFAULTS, "vocab_size": 250112, "d_ff": 1024, "num_layers": 8, "num_heads": 6,
                     "feed_forward_proj": "gated-gelu"}}

# (activation, gated) -> feed_forward_proj. "gated-gelu" is T5 v1.1's and means the tanh GELU
# (transformers' special case), so a gated exact GELU has no spelling and is refused on export.
_FEED_FORWARD_TO_HF = {("gelu_tanh", True): "gated-gelu", ("relu", False): "relu", ("relu", True): "gated-relu",
                       ("silu", True): "gated-silu", ("silu", False): "silu", ("gelu", False): "gelu",
                       ("gelu_tanh", False): "gelu_new"}

Reader = Callable[[str], np.ndarray]


def _refuse(field: str, value, why: str):
    raise HFConversionError(f"config.json: {field}={value!r}: {why}")


def _feed_forward(c: dict) -> tuple[str, bool]:
    """(our activation, gated) of a config, read as transformers 5's T5Config reads it: from
    feed_forward_proj ("gated-gelu" meaning the tanh GELU), unless dense_act_fn / is_gated_act, which
    it also saves, say otherwise (they win when both are in config.json)."""
    proj = c["feed_forward_proj"]
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        _refuse("feed_forward_proj", proj, "expected 'gated-ACT' or 'ACT'")
    act = c.get("dense_act_fn", "gelu_new" if proj == "gated-gelu" else parts[-1])
    if act not in ACTIVATIONS_FROM_HF:
        field, value = ("dense_act_fn", act) if "dense_act_fn" in c else ("feed_forward_proj", proj)
        _refuse(field, value, f"activation {act!r} is not implemented (llm_jax has {', '.join(ACTIVATIONS_FROM_HF)})")
    return ACTIVATIONS_FROM_HF[act], bool(c.get("is_gated_act", parts[0] == "gated"))


def _tied(hf: dict) -> bool:
    """Whether the checkpoint is ours tied (the embedding as output, scaled by d_model**-0.5)."""
    if hf.get("model_type") == "mt5":
        return False  # MT5ForConditionalGeneration never scales: an untied lm_head (checked on read)
    if hf.get("scale_decoder_outputs") is not None:
        return bool(hf["scale_decoder_outputs"])
    return bool(hf.get("tie_word_embeddings", True))


def model_keys_from_hf(hf: dict) -> dict:
    """Our model keys (ModelConfig field names) of a T5 / mT5 config.json; every field that changes the
    network's function is checked, and one we cannot reproduce is refused by name."""
    model_type = hf.get("model_type", "t5")
    if model_type not in _DEFAULTS:
        _refuse("model_type", model_type, "each layer has its own relative position biases; llm_jax's t5 has one "
                "table per stack" if model_type == "umt5" else f"not one of {', '.join(_DEFAULTS)}")
    c = {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    if c.get("is_encoder_decoder") is False:
        _refuse("is_encoder_decoder", False, "llm_jax's t5 is an encoder-decoder")
    if c.get("is_decoder"):
        _refuse("is_decoder", True, "llm_jax's t5 is an encoder-decoder, not its decoder alone")
    start = c.get("decoder_start_token_id", DECODER_START_ID)
    if start != DECODER_START_ID:
        _refuse("decoder_start_token_id", start, f"llm_jax's t5 starts decoding from id {DECODER_START_ID}")
    activation, gated = _feed_forward(c)
    num_layers = c["num_layers"]
    decoder_layers = c.get("num_decoder_layers", num_layers)
    keys = {"arch": "t5", "vocab_size": c["vocab_size"], "n_layers": num_layers, "d_model": c["d_model"],
            "n_heads": c["num_heads"], "d_ff": c["d_ff"], "position": "relative", "activation": activation,
            "gated_mlp": gated, "tie_embeddings": _tied(c),
            "relative_buckets": c["relative_attention_num_buckets"],
            "relative_max_distance": c["relative_attention_max_distance"],
            "norm_eps": float(c["layer_norm_epsilon"]), "dropout": 0.0}
    if decoder_layers != num_layers:
        keys["n_decoder_layers"] = decoder_layers
    if c["d_kv"] * c["num_heads"] != c["d_model"]:
        keys["head_dim"] = c["d_kv"]
    return keys


def hf_config_from_model(model: ModelConfig) -> dict:
    """T5ForConditionalGeneration's config.json for `model`, every convention written out (for
    transformers 5 and the older releases that read tie_word_embeddings as the scale). pad and eos ids
    are our tokenizers' (data/tokenizer.py); an export with another tokenizer writes that one's special
    ids over them. decoder_start_token_id is what our decoding starts from."""
    if model.kv_heads != model.n_heads:
        raise HFConversionError(f"model.n_kv_heads={model.n_kv_heads} has no Hugging Face T5 equivalent: "
                                "T5 has no grouped-query attention")
    ff = (model.resolved_activation, model.resolved_gated_mlp)
    if ff not in _FEED_FORWARD_TO_HF:
        raise HFConversionError(f"model.activation={ff[0]} with model.gated_mlp={ff[1]} has no Hugging Face T5 "
                                "equivalent: feed_forward_proj 'gated-gelu' is the tanh GELU")
    proj, tied = _FEED_FORWARD_TO_HF[ff], model.resolved_tie_embeddings
    return {"architectures": [ARCHITECTURE], "model_type": "t5", "is_encoder_decoder": True,
            "vocab_size": model.vocab_size, "d_model": model.d_model, "d_kv": model.resolved_head_dim,
            "d_ff": model.d_ff, "num_layers": model.encoder_layers, "num_decoder_layers": model.decoder_layers,
            "num_heads": model.n_heads, "relative_attention_num_buckets": model.relative_buckets,
            "relative_attention_max_distance": model.relative_max_distance, "dropout_rate": 0.0,
            "layer_norm_epsilon": model.resolved_norm_eps, "initializer_factor": 1.0, "feed_forward_proj": proj,
            "dense_act_fn": "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1],
            "is_gated_act": model.resolved_gated_mlp, "tie_word_embeddings": tied, "scale_decoder_outputs": tied,
            "pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "decoder_start_token_id": DECODER_START_ID,
            "use_cache": True}


def _get(read: Reader, names: Collection[str], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in names:
        raise HFConversionError(f"weights: {name} is missing")
    x = np.asarray(read(name))
    if x.shape != shape:
        raise HFConversionError(f"weights: {name} has shape {list(x.shape)}, config.json implies {list(shape)}")
    return x


def _mlp_names(model: ModelConfig) -> tuple[tuple[str, str], ...]:
    """(ours, Hugging Face's) names of one MLP's kernels."""
    if model.resolved_gated_mlp:
        return ("gate", "wi_0"), ("up", "wi_1"), ("proj", "wo")
    return ("fc", "wi"), ("proj", "wo")


def _stack_layers(model: ModelConfig) -> tuple[tuple[str, int, tuple], ...]:
    """Per stack: (side, blocks, ((our sublayer, its norm, HF layer index, HF attention name), ...))."""
    return (("encoder", model.encoder_layers, (("attn", "attn_norm", 0, "SelfAttention"),)),
            ("decoder", model.decoder_layers, (("self_attn", "self_attn_norm", 0, "SelfAttention"),
                                               ("cross_attn", "cross_attn_norm", 1, "EncDecAttention"))))


def params_from_hf(model: ModelConfig, read: Reader, names: Collection[str]) -> dict:
    """Our unscanned parameter tree from a T5ForConditionalGeneration checkpoint. The embedding is
    shared.weight, or one of its tied copies (encoder/decoder.embed_tokens) where a file keeps only those."""
    names = set(names)
    e, h, d, f, v = model.d_model, model.n_heads, model.resolved_head_dim, model.d_ff, model.vocab_size
    get = lambda name, shape: _get(read, names, name, shape)  # noqa: E731
    embed_name = next((n for n in ("shared.weight", *_EMBED_COPIES) if n in names), "shared.weight")
    params = {"embed": {"embedding": get(embed_name, (v, e))}}
    for copy in _EMBED_COPIES:
        if copy != embed_name and copy in names and not np.array_equal(get(copy, (v, e)), params["embed"]["embedding"]):
            raise HFConversionError(f"weights: {copy} is not {embed_name}; llm_jax's t5 has one embedding")

    def attention(prefix):
        p = {ours: {"kernel": get(f"{prefix}.{theirs}.weight", (h * d, e)).T.reshape(e, h, d)}
             for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"))}
        p["out"] = {"kernel": get(f"{prefix}.o.weight", (e, h * d)).T.reshape(h, d, e)}
        return p

    for side, n_layers, attentions in _stack_layers(model):
        stack = {"relative_position": {"bias": get(
            f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (model.relative_buckets, h))},
            "final_norm": {"scale": get(f"{side}.final_layer_norm.weight", (e,))}}
        for i in range(n_layers):
            block, layer = f"{side}.block.{i}.layer", {}
            for ours, norm, index, theirs in attentions:
                layer[norm] = {"scale": get(f"{block}.{index}.layer_norm.weight", (e,))}
                layer[ours] = attention(f"{block}.{index}.{theirs}")
            mlp = f"{block}.{len(attentions)}"
            layer["mlp_norm"] = {"scale": get(f"{mlp}.layer_norm.weight", (e,))}
            layer["mlp"] = {ours: {"kernel": get(f"{mlp}.DenseReluDense.{theirs}.weight",
                                                 (e, f) if theirs == "wo" else (f, e)).T}
                            for ours, theirs in _mlp_names(model)}
            stack[f"layer_{i}"] = layer
        params[side] = stack
    if not model.resolved_tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight", (v, e)).T}
    elif "lm_head.weight" in names and not np.array_equal(get("lm_head.weight", (v, e)), params["embed"]["embedding"]):
        _refuse("scale_decoder_outputs", True, "the checkpoint's lm_head.weight is not its shared.weight, and "
                "llm_jax scales the decoder output (d_model**-0.5) only when the embedding is the output")
    return params


def params_to_hf(model: ModelConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """T5ForConditionalGeneration's tensors as save_pretrained writes them (the tied copies of
    shared.weight left out; lm_head.weight only when untied)."""
    e, h, d = model.d_model, model.n_heads, model.resolved_head_dim

    def out(name, x):
        return name, np.ascontiguousarray(x)

    yield out("shared.weight", params["embed"]["embedding"])
    for side, n_layers, attentions in _stack_layers(model):
        stack = params[side]
        yield out(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                  stack["relative_position"]["bias"])
        for i in range(n_layers):
            block, layer = f"{side}.block.{i}.layer", stack[f"layer_{i}"]
            for ours, norm, index, theirs in attentions:
                yield out(f"{block}.{index}.layer_norm.weight", layer[norm]["scale"])
                for name, hf_name in (("query", "q"), ("key", "k"), ("value", "v")):
                    yield out(f"{block}.{index}.{theirs}.{hf_name}.weight",
                              layer[ours][name]["kernel"].reshape(e, h * d).T)
                yield out(f"{block}.{index}.{theirs}.o.weight", layer[ours]["out"]["kernel"].reshape(h * d, e).T)
            mlp = f"{block}.{len(attentions)}"
            yield out(f"{mlp}.layer_norm.weight", layer["mlp_norm"]["scale"])
            for ours, theirs in _mlp_names(model):
                yield out(f"{mlp}.DenseReluDense.{theirs}.weight", layer["mlp"][ours]["kernel"].T)
        yield out(f"{side}.final_layer_norm.weight", stack["final_norm"]["scale"])
    if not model.resolved_tie_embeddings:
        yield out("lm_head.weight", params["lm_head"]["kernel"].T)
