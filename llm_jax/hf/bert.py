"""BERT <-> Hugging Face's BertForMaskedLM / BertModel (model_type "bert"): config.json and tensor names.

The parameter tree mirrors BertForMaskedLM one for one (the table in models/encoder.py's docstring), so
the mapping is names, transposes (torch Linear weights are [out, in]) and the split of E into heads x
head_dim. Two of our parameters may be absent from a Hugging Face file, and are then initialised as
transformers initialises them when it loads a checkpoint lacking them, with one warning each:
- the masked-LM head (`cls.predictions.*`), absent from a BertModel checkpoint: transform dense
  normal(initializer_range), its LayerNorm ones/zeros, output bias zeros, decoder tied (untied: its
  kernel normal(initializer_range));
- the pooler (`bert.pooler.dense`), absent from a BertForMaskedLM checkpoint (transformers builds
  BertForMaskedLM without one): dense normal(initializer_range), bias zeros.
Export writes BertForMaskedLM's tensors and the pooler too, so that a classifier fine-tuned from the
export (BertForSequenceClassification) starts from our pooler; BertForMaskedLM ignores it on load.

The output bias: transformers' forward adds `cls.predictions.decoder.bias`, which is
`cls.predictions.bias` when tied and its own tensor when untied (the other then unused); ours is the
decoder's where the file has it, and is written as both on export (untied). A tied copy of the word
embeddings in the file (cls.predictions.decoder.weight) must equal them, or transformers would not
tie them and the model would not be ours. Not weights, so ignored: BertForPreTraining's
next-sentence head (cls.seq_relationship, which BertForMaskedLM ignores too) and the position_ids
buffer of old checkpoints. Dropout rates are training settings: the import sets model.dropout=0 and
the export writes 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator

import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.data.tokenizer import PAD_ID
from llm_jax.hf.errors import HFConversionError
from llm_jax.hf.gpt2 import ACTIVATIONS as ACTIVATIONS_FROM_HF  # transformers' ACT2FN names -> ours
from llm_jax.hf.gpt2 import HF_ACTIVATIONS as ACTIVATIONS_TO_HF
from llm_jax.models.encoder import TOKEN_TYPES

log = logging.getLogger(__name__)

MODEL_TYPES = ("bert",)
ARCHITECTURE = "BertForMaskedLM"
# Tensors that are not our weights (convert.py checks every other one is used).
IGNORED_SUFFIXES = ("cls.seq_relationship.weight", "cls.seq_relationship.bias", "embeddings.position_ids")

# BertConfig's defaults (transformers 5): what a config.json without the key means.
_DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
             "initializer_range": 0.02, "layer_norm_eps": 1e-12, "tie_word_embeddings": True}

Reader = Callable[[str], np.ndarray]


def _refuse(field: str, value, why: str):
    raise HFConversionError(f"config.json: {field}={value!r}: {why}")


def _refuse_model(key: str, value, why: str):
    raise HFConversionError(f"model.{key}={value!r} has no Hugging Face BERT equivalent: {why}")


def model_keys_from_hf(hf: dict) -> dict:
    """Our model keys (ModelConfig field names) of a BERT config.json; every field that changes the
    network's function is checked, and one we cannot reproduce is refused by name."""
    c = {**_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if c["hidden_act"] not in ACTIVATIONS_FROM_HF:
        _refuse("hidden_act", c["hidden_act"], f"not implemented (llm_jax has {', '.join(ACTIVATIONS_FROM_HF)})")
    if c.get("position_embedding_type", "absolute") != "absolute":
        _refuse("position_embedding_type", c["position_embedding_type"], "only absolute (learned) positions are "
                "implemented for bert")
    if c["type_vocab_size"] != TOKEN_TYPES:
        _refuse("type_vocab_size", c["type_vocab_size"], f"llm_jax's bert has {TOKEN_TYPES} token types")
    for field in ("is_decoder", "add_cross_attention"):
        if c.get(field):
            _refuse(field, c[field], "llm_jax's bert is a bidirectional encoder without cross-attention")
    if c["hidden_size"] % c["num_attention_heads"]:
        _refuse("num_attention_heads", c["num_attention_heads"], f"does not divide hidden_size={c['hidden_size']}")
    return {"arch": "bert", "vocab_size": c["vocab_size"], "n_layers": c["num_hidden_layers"],
            "d_model": c["hidden_size"], "n_heads": c["num_attention_heads"], "d_ff": c["intermediate_size"],
            "max_len": c["max_position_embeddings"], "position": "learned",
            "activation": ACTIVATIONS_FROM_HF[c["hidden_act"]], "gated_mlp": False,
            "norm_eps": float(c["layer_norm_eps"]), "tie_embeddings": bool(c["tie_word_embeddings"]),
            "dropout": 0.0, "init_std": float(c["initializer_range"])}


def hf_config_from_model(model: ModelConfig) -> dict:
    """BertForMaskedLM's config.json for `model`, every convention written out; a model BERT cannot
    express (other positions, grouped-query heads, a head width other than d_model / n_heads, a gated
    MLP) is refused by key. pad_token_id is our tokenizers' (data/tokenizer.py); an export with another
    tokenizer writes that one's special ids over it."""
    if model.resolved_position != "learned":
        _refuse_model("position", model.resolved_position, "BERT has learned positions only")
    if model.kv_heads != model.n_heads:
        _refuse_model("n_kv_heads", model.n_kv_heads, "BERT has no grouped-query attention")
    if model.d_model % model.n_heads or model.resolved_head_dim != model.d_model // model.n_heads:
        _refuse_model("head_dim", model.head_dim, "BERT's heads are d_model / n_heads wide")
    if model.resolved_gated_mlp:
        _refuse_model("gated_mlp", True, "BERT's MLP is not gated")
    return {"architectures": [ARCHITECTURE], "model_type": "bert", "vocab_size": model.vocab_size,
            "hidden_size": model.d_model, "num_hidden_layers": model.n_layers,
            "num_attention_heads": model.n_heads, "intermediate_size": model.d_ff,
            "hidden_act": ACTIVATIONS_TO_HF[model.resolved_activation], "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "classifier_dropout": None, "max_position_embeddings": model.max_len,
            "position_embedding_type": "absolute", "type_vocab_size": TOKEN_TYPES,
            "initializer_range": model.init_std, "layer_norm_eps": model.resolved_norm_eps,
            "tie_word_embeddings": model.resolved_tie_embeddings, "is_decoder": False, "add_cross_attention": False,
            "pad_token_id": PAD_ID}


class _Tensors:
    """Reads HF tensors by name, checking each one's shape against the config. Older checkpoints name
    LayerNorm parameters gamma/beta (transformers renames them on load); both spellings are read."""

    _OLD = {".weight": ".gamma", ".bias": ".beta"}

    def __init__(self, read: Reader, names: Collection[str]):
        self.read, self.names = read, set(names)

    def has(self, name: str) -> bool:
        return self._stored(name) is not None

    def _stored(self, name: str) -> str | None:
        if name in self.names:
            return name
        for new, old in self._OLD.items():
            if "LayerNorm" in name and name.endswith(new) and name[:-len(new)] + old in self.names:
                return name[:-len(new)] + old
        return None

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        stored = self._stored(name)
        if stored is None:
            raise HFConversionError(f"weights: {name} is missing")
        x = np.asarray(self.read(stored))
        if x.shape != shape:
            raise HFConversionError(f"weights: {stored} has shape {list(x.shape)}, config.json implies {list(shape)}")
        return x


def params_from_hf(model: ModelConfig, read: Reader, names: Collection[str]) -> dict:
    """Our unscanned parameter tree from a BertForMaskedLM, BertForPreTraining or BertModel checkpoint
    (BertModel's names lack the "bert." prefix). Other heads in the file (next-sentence prediction)
    are not read."""
    t = _Tensors(read, names)
    p = "bert." if t.has("bert.embeddings.word_embeddings.weight") else ""
    e, h, d, f, v = model.d_model, model.n_heads, model.resolved_head_dim, model.d_ff, model.vocab_size

    def dense(name, n_in, n_out):
        return {"kernel": t.get(f"{name}.weight", (n_out, n_in)).T, "bias": t.get(f"{name}.bias", (n_out,))}

    def norm(name):
        return {"scale": t.get(f"{name}.weight", (e,)), "bias": t.get(f"{name}.bias", (e,))}

    def heads_in(name):  # [H*D, E] -> [E, H, D]
        return {"kernel": t.get(f"{name}.weight", (h * d, e)).T.reshape(e, h, d),
                "bias": t.get(f"{name}.bias", (h * d,)).reshape(h, d)}

    params = {"embed": {"embedding": t.get(f"{p}embeddings.word_embeddings.weight", (v, e))},
              "pos_embed": {"embedding": t.get(f"{p}embeddings.position_embeddings.weight", (model.max_len, e))},
              "type_embed": {"embedding": t.get(f"{p}embeddings.token_type_embeddings.weight", (TOKEN_TYPES, e))},
              "embed_norm": norm(f"{p}embeddings.LayerNorm")}
    for i in range(model.n_layers):
        layer = f"{p}encoder.layer.{i}"
        attn = {ours: heads_in(f"{layer}.attention.self.{ours}") for ours in ("query", "key", "value")}
        attn["out"] = {"kernel": t.get(f"{layer}.attention.output.dense.weight", (e, h * d)).T.reshape(h, d, e),
                       "bias": t.get(f"{layer}.attention.output.dense.bias", (e,))}
        params[f"layer_{i}"] = {
            "attn": attn, "attn_norm": norm(f"{layer}.attention.output.LayerNorm"),
            "mlp": {"fc": dense(f"{layer}.intermediate.dense", e, f), "proj": dense(f"{layer}.output.dense", f, e)},
            "mlp_norm": norm(f"{layer}.output.LayerNorm")}

    dtype = params["embed"]["embedding"].dtype
    rng = np.random.default_rng(0)
    if t.has("cls.predictions.transform.dense.weight"):
        head = {"transform": dense("cls.predictions.transform.dense", e, e),
                "transform_norm": norm("cls.predictions.transform.LayerNorm")}
        if not model.resolved_tie_embeddings:
            head["decoder"] = {"kernel": t.get("cls.predictions.decoder.weight", (v, e)).T}
        elif t.has("cls.predictions.decoder.weight") and not np.array_equal(
                t.get("cls.predictions.decoder.weight", (v, e)), params["embed"]["embedding"]):
            _refuse("tie_word_embeddings", True, "the checkpoint's cls.predictions.decoder.weight is not its word "
                    "embeddings")
        biases = [t.get(name, (v,)) for name in ("cls.predictions.bias", "cls.predictions.decoder.bias")
                  if t.has(name)]
        if not biases:
            raise HFConversionError("weights: cls.predictions.bias is missing")
        head["bias"] = biases[-1]  # the decoder's, which transformers' forward adds
    else:
        log.warning("mlm_head: the checkpoint has no masked-LM head (cls.predictions.*); it starts as "
                    "transformers initialises it (dense normal(%s), LayerNorm ones/zeros, bias zeros)", model.init_std)
        head = {"transform": _new_dense(rng, e, e, model.init_std, dtype),
                "transform_norm": {"scale": np.ones((e,), dtype), "bias": np.zeros((e,), dtype)},
                "bias": np.zeros((v,), dtype)}
        if not model.resolved_tie_embeddings:
            head["decoder"] = {"kernel": _new_dense(rng, e, v, model.init_std, dtype)["kernel"]}
    params["mlm_head"] = head
    if t.has(f"{p}pooler.dense.weight"):
        params["pooler"] = dense(f"{p}pooler.dense", e, e)
    else:
        log.warning("pooler: the checkpoint has no pooler (%spooler.dense); it starts as transformers "
                    "initialises it (dense normal(%s), bias zeros)", p, model.init_std)
        params["pooler"] = _new_dense(rng, e, e, model.init_std, dtype)
    return params


def _new_dense(rng: np.random.Generator, n_in: int, n_out: int, std: float, dtype) -> dict:
    return {"kernel": (rng.standard_normal((n_in, n_out)) * std).astype(dtype), "bias": np.zeros((n_out,), dtype)}


def params_to_hf(model: ModelConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """BertForMaskedLM's tensors (as save_pretrained writes them: tied copies left out) and the pooler's."""
    e, h, d = model.d_model, model.n_heads, model.resolved_head_dim

    def out(name, x):
        return name, np.ascontiguousarray(x)

    def dense(name, p):
        yield out(f"{name}.weight", p["kernel"].T)
        yield out(f"{name}.bias", p["bias"])

    def norm(name, p):
        yield out(f"{name}.weight", p["scale"])
        yield out(f"{name}.bias", p["bias"])

    yield out("bert.embeddings.word_embeddings.weight", params["embed"]["embedding"])
    yield out("bert.embeddings.position_embeddings.weight", params["pos_embed"]["embedding"])
    yield out("bert.embeddings.token_type_embeddings.weight", params["type_embed"]["embedding"])
    yield from norm("bert.embeddings.LayerNorm", params["embed_norm"])
    for i in range(model.n_layers):
        layer, ours = f"bert.encoder.layer.{i}", params[f"layer_{i}"]
        for name in ("query", "key", "value"):
            yield out(f"{layer}.attention.self.{name}.weight", ours["attn"][name]["kernel"].reshape(e, h * d).T)
            yield out(f"{layer}.attention.self.{name}.bias", ours["attn"][name]["bias"].reshape(h * d))
        yield out(f"{layer}.attention.output.dense.weight", ours["attn"]["out"]["kernel"].reshape(h * d, e).T)
        yield out(f"{layer}.attention.output.dense.bias", ours["attn"]["out"]["bias"])
        yield from norm(f"{layer}.attention.output.LayerNorm", ours["attn_norm"])
        yield from dense(f"{layer}.intermediate.dense", ours["mlp"]["fc"])
        yield from dense(f"{layer}.output.dense", ours["mlp"]["proj"])
        yield from norm(f"{layer}.output.LayerNorm", ours["mlp_norm"])
    yield from dense("bert.pooler.dense", params["pooler"])
    head = params["mlm_head"]
    yield from dense("cls.predictions.transform.dense", head["transform"])
    yield from norm("cls.predictions.transform.LayerNorm", head["transform_norm"])
    yield out("cls.predictions.bias", head["bias"])
    if not model.resolved_tie_embeddings:
        yield out("cls.predictions.decoder.weight", head["decoder"]["kernel"].T)
        yield out("cls.predictions.decoder.bias", head["bias"])
