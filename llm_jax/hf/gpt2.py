"""GPT-2 <-> Hugging Face GPT2LMHeadModel: config.json and tensor names both ways.

HF's GPT-2 stores its projections as Conv1D weights, [in, out] (our kernels' order, no transpose);
c_attn holds query, key and value side by side, each [E, H x D] with the heads major, as our
[E, H, D] kernels flatten. Its blocks are ours: pre-LayerNorm, biases everywhere, learned positions
(n_positions -> model.max_len), GELU with the tanh approximation ("gelu_new"), tied output by default.

Checkpoints saved from GPT2Model (the original "gpt2" on the Hub) have no "transformer." prefix; both
are read. The causal-mask buffers some old checkpoints carry (attn.bias, attn.masked_bias) are not
weights and are ignored.

Config fields that would change the function and that llm_jax does not implement are refused by
name: scale_attn_weights=false, scale_attn_by_inverse_layer_idx=true, add_cross_attention=true, an
activation we lack. reorder_and_upcast_attn only reorders float32 arithmetic under mixed precision,
so it is accepted. Dropout rates are training settings: the import sets model.dropout=0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.hf.errors import HFConversionError

MODEL_TYPES = ("gpt2",)
ARCHITECTURE = "GPT2LMHeadModel"

# HF activation_function -> model.activation (transformers' ACT2FN names), and back.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
               "silu": "silu", "swish": "silu"}
HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
# Tensors that are not weights: causal-mask buffers of old GPT-2 checkpoints.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# Fields whose non-default value changes the function, and that default.
_REFUSED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}


def model_keys_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    for field, default in _REFUSED.items():
        if hf.get(field, default) != default:
            raise HFConversionError(f"config.json: {field}={hf[field]!r} is not implemented by llm_jax's gpt2 "
                                    f"(only {default!r})")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise HFConversionError(f"config.json: activation_function={act!r} is not implemented; llm_jax has "
                                f"{', '.join(ACTIVATIONS)}")
    d_model = int(hf.get("n_embd", 768))
    n_inner = hf.get("n_inner")
    return {"arch": "gpt2", "vocab_size": int(hf["vocab_size"]), "n_layers": int(hf.get("n_layer", 12)),
            "d_model": d_model, "n_heads": int(hf.get("n_head", 12)),
            "d_ff": int(n_inner) if n_inner is not None else 4 * d_model, "max_len": int(hf.get("n_positions", 1024)),
            "position": "learned", "activation": ACTIVATIONS[act], "gated_mlp": False,
            "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "dropout": 0.0,
            "init_std": float(hf.get("initializer_range", 0.02))}


def hf_config_from_model(model: ModelConfig) -> dict[str, Any]:
    checks = [(model.arch == "gpt2", f"model.arch={model.arch}"),
              (model.resolved_position == "learned",
               f"model.position={model.resolved_position} (GPT2LMHeadModel has learned positions only)"),
              (not model.resolved_gated_mlp, "model.gated_mlp=true (GPT2LMHeadModel's MLP is not gated)"),
              (model.kv_heads == model.n_heads,
               f"model.n_kv_heads={model.kv_heads} (GPT2LMHeadModel has no grouped-query attention)"),
              (model.resolved_head_dim * model.n_heads == model.d_model,
               f"model.head_dim={model.resolved_head_dim} (GPT2LMHeadModel's heads split n_embd)"),
              (model.resolved_activation in HF_ACTIVATIONS, f"model.activation={model.resolved_activation}")]
    for ok, what in checks:
        if not ok:
            raise HFConversionError(f"{what} has no Hugging Face GPT-2 equivalent")
    return {"architectures": [ARCHITECTURE], "model_type": "gpt2", "vocab_size": model.vocab_size,
            "n_positions": model.max_len, "n_embd": model.d_model, "n_layer": model.n_layers, "n_head": model.n_heads,
            "n_inner": model.d_ff, "activation_function": HF_ACTIVATIONS[model.resolved_activation],
            "layer_norm_epsilon": model.resolved_norm_eps, "tie_word_embeddings": model.resolved_tie_embeddings,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "add_cross_attention": False, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "initializer_range": model.init_std, "use_cache": True}


def _prefix(names: frozenset[str] | set[str]) -> str:
    return "transformer." if "transformer.wte.weight" in names else ""


def params_from_hf(model: ModelConfig, read: Callable[[str], np.ndarray], names) -> dict[str, Any]:
    p = _prefix(names)
    e, h, d = model.d_model, model.n_heads, model.resolved_head_dim

    def norm(name):
        return {"scale": read(f"{name}.weight"), "bias": read(f"{name}.bias")}

    params: dict[str, Any] = {"embed": {"embedding": read(p + "wte.weight")},
                              "pos_embed": {"embedding": read(p + "wpe.weight")}, "final_norm": norm(p + "ln_f")}
    for i in range(model.n_layers):
        b = f"{p}h.{i}."
        qkv_w = read(b + "attn.c_attn.weight")  # [E, 3 * E]
        qkv_b = read(b + "attn.c_attn.bias")  # [3 * E]
        attn = {name: {"kernel": qkv_w[:, j * e:(j + 1) * e].reshape(e, h, d),
                       "bias": qkv_b[j * e:(j + 1) * e].reshape(h, d)}
                for j, name in enumerate(("query", "key", "value"))}
        attn["out"] = {"kernel": read(b + "attn.c_proj.weight").reshape(h, d, e), "bias": read(b + "attn.c_proj.bias")}
        mlp = {name: {"kernel": read(f"{b}mlp.{hf}.weight"), "bias": read(f"{b}mlp.{hf}.bias")}
               for name, hf in (("fc", "c_fc"), ("proj", "c_proj"))}
        params[f"layer_{i}"] = {"attn_norm": norm(b + "ln_1"), "attn": attn, "mlp_norm": norm(b + "ln_2"), "mlp": mlp}
    if not model.resolved_tie_embeddings:
        params["lm_head"] = {"kernel": read("lm_head.weight").T}
    return params


def params_to_hf(model: ModelConfig, params: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    e = model.d_model
    yield "transformer.wte.weight", params["embed"]["embedding"]
    yield "transformer.wpe.weight", params["pos_embed"]["embedding"]
    for i in range(model.n_layers):
        layer, b = params[f"layer_{i}"], f"transformer.h.{i}."
        attn = layer["attn"]
        for name, hf in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            yield f"{b}{hf}.weight", layer[name]["scale"]
            yield f"{b}{hf}.bias", layer[name]["bias"]
        yield b + "attn.c_attn.weight", np.concatenate([attn[n]["kernel"].reshape(e, -1)
                                                        for n in ("query", "key", "value")], axis=1)
        yield b + "attn.c_attn.bias", np.concatenate([attn[n]["bias"].reshape(-1) for n in ("query", "key", "value")])
        yield b + "attn.c_proj.weight", attn["out"]["kernel"].reshape(-1, e)
        yield b + "attn.c_proj.bias", attn["out"]["bias"]
        for name, hf in (("fc", "c_fc"), ("proj", "c_proj")):
            yield f"{b}mlp.{hf}.weight", layer["mlp"][name]["kernel"]
            yield f"{b}mlp.{hf}.bias", layer["mlp"][name]["bias"]
    yield "transformer.ln_f.weight", params["final_norm"]["scale"]
    yield "transformer.ln_f.bias", params["final_norm"]["bias"]
    if not model.resolved_tie_embeddings:
        yield "lm_head.weight", params["lm_head"]["kernel"].T
