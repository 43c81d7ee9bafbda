"""Llama <-> Hugging Face LlamaForCausalLM (and Mistral-style configs): config.json and tensor names.

The function is ours exactly: RMSNorm blocks (rms_norm_eps), no biases, SwiGLU MLP (gate, up, down),
grouped-query attention (num_key_value_heads, head_dim), rotary positions in the "rotate half"
layout, dim i paired with dim i + D/2 (transformers' rotate_half, our layers.apply_rope), with
inverse frequencies theta ** (-2i / D), so q_proj and k_proj need no permutation. torch Linear
weights are [out, in]: every projection is transposed, and q/k/v/o reshaped to our head axes.

Refused by name: RoPE scaling of any type but "default" (rope_parameters / rope_scaling: linear,
dynamic, yarn, llama3, ... are not implemented), attention_bias or mlp_bias, a Mistral
sliding_window shorter than max_position_embeddings (a window that never cuts is full attention, as
ours), an activation we lack. Where transformers 5 writes `rope_parameters` (rope_type, rope_theta),
older config.json files have `rope_theta` and `rope_scaling`; both are read, and an export writes both.
Checkpoints saved from LlamaModel (no "model." prefix) are read too. The export always names
LlamaForCausalLM: a Mistral with no window is that model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.hf.errors import HFConversionError

MODEL_TYPES = ("llama", "mistral")
ARCHITECTURE = "LlamaForCausalLM"

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "relu": "relu"}
HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # a buffer of old checkpoints, recomputed from rope_theta


def rope_theta(hf: dict[str, Any]) -> float:
    """The RoPE base of a config.json, refusing any scaling (transformers 5's rope_parameters or the older
    rope_theta + rope_scaling)."""
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
            raise HFConversionError(f"config.json: {field}={rope!r}: RoPE scaling is not implemented "
                                    "(only rope_type default)")
        if field == "rope_parameters" and "rope_theta" in rope:
            return float(rope["rope_theta"])
    return float(hf.get("rope_theta", 10000.0))


def model_keys_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise HFConversionError(f"config.json: {field}=true: llm_jax's llama has no biases")
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise HFConversionError(f"config.json: hidden_act={act!r} is not implemented; llm_jax has "
                                f"{', '.join(ACTIVATIONS)}")
    max_len = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    if window is not None and int(window) < max_len:
        raise HFConversionError(f"config.json: sliding_window={window} (shorter than max_position_embeddings="
                                f"{max_len}): sliding-window attention is not implemented")
    theta = rope_theta(hf)
    d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    head_dim = None if head_dim is None or int(head_dim) == d_model // n_heads else int(head_dim)
    n_kv = hf.get("num_key_value_heads")
    return {"arch": "llama", "vocab_size": int(hf["vocab_size"]), "n_layers": int(hf["num_hidden_layers"]),
            "d_model": d_model, "n_heads": n_heads, "n_kv_heads": None if n_kv is None else int(n_kv),
            "head_dim": head_dim, "d_ff": int(hf["intermediate_size"]), "max_len": max_len, "position": "rope",
            "activation": ACTIVATIONS[act], "gated_mlp": True, "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "rope_theta": theta, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "dropout": 0.0,
            "init_std": float(hf.get("initializer_range", 0.02))}


def hf_config_from_model(model: ModelConfig) -> dict[str, Any]:
    checks = [(model.arch == "llama", f"model.arch={model.arch}"),
              (model.resolved_position == "rope",
               f"model.position={model.resolved_position} (LlamaForCausalLM has rotary positions only)"),
              (model.resolved_gated_mlp, "model.gated_mlp=false (LlamaForCausalLM's MLP is gated)"),
              (model.resolved_activation in HF_ACTIVATIONS, f"model.activation={model.resolved_activation}")]
    for ok, what in checks:
        if not ok:
            raise HFConversionError(f"{what} has no Hugging Face Llama equivalent")
    return {"architectures": [ARCHITECTURE], "model_type": "llama", "vocab_size": model.vocab_size,
            "hidden_size": model.d_model, "intermediate_size": model.d_ff, "num_hidden_layers": model.n_layers,
            "num_attention_heads": model.n_heads, "num_key_value_heads": model.kv_heads,
            "head_dim": model.resolved_head_dim, "hidden_act": HF_ACTIVATIONS[model.resolved_activation],
            "max_position_embeddings": model.max_len, "rms_norm_eps": model.resolved_norm_eps,
            "rope_theta": model.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
            "tie_word_embeddings": model.resolved_tie_embeddings, "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "initializer_range": model.init_std, "use_cache": True}


def _prefix(names) -> str:
    return "model." if "model.embed_tokens.weight" in names else ""


def params_from_hf(model: ModelConfig, read: Callable[[str], np.ndarray], names) -> dict[str, Any]:
    p = _prefix(names)
    e, d = model.d_model, model.resolved_head_dim
    params: dict[str, Any] = {"embed": {"embedding": read(p + "embed_tokens.weight")},
                              "final_norm": {"scale": read(p + "norm.weight")}}
    for i in range(model.n_layers):
        b = f"{p}layers.{i}."
        attn = {name: {"kernel": read(f"{b}self_attn.{hf}.weight").T.reshape(e, heads, d)}
                for name, hf, heads in (("query", "q_proj", model.n_heads), ("key", "k_proj", model.kv_heads),
                                        ("value", "v_proj", model.kv_heads))}
        attn["out"] = {"kernel": read(b + "self_attn.o_proj.weight").T.reshape(model.n_heads, d, e)}
        mlp = {name: {"kernel": read(f"{b}mlp.{hf}.weight").T}
               for name, hf in (("gate", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj"))}
        params[f"layer_{i}"] = {"attn_norm": {"scale": read(b + "input_layernorm.weight")}, "attn": attn,
                                "mlp_norm": {"scale": read(b + "post_attention_layernorm.weight")}, "mlp": mlp}
    if not model.resolved_tie_embeddings:
        params["lm_head"] = {"kernel": read("lm_head.weight").T}
    return params


def params_to_hf(model: ModelConfig, params: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    e = model.d_model
    yield "model.embed_tokens.weight", params["embed"]["embedding"]
    for i in range(model.n_layers):
        layer, b = params[f"layer_{i}"], f"model.layers.{i}."
        attn = layer["attn"]
        yield b + "input_layernorm.weight", layer["attn_norm"]["scale"]
        for name, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            yield f"{b}self_attn.{hf}.weight", attn[name]["kernel"].reshape(e, -1).T
        yield b + "self_attn.o_proj.weight", attn["out"]["kernel"].reshape(-1, e).T
        yield b + "post_attention_layernorm.weight", layer["mlp_norm"]["scale"]
        for name, hf in (("gate", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj")):
            yield f"{b}mlp.{hf}.weight", layer["mlp"][name]["kernel"].T
    yield "model.norm.weight", params["final_norm"]["scale"]
    if not model.resolved_tie_embeddings:
        yield "lm_head.weight", params["lm_head"]["kernel"].T
