"""`llm-jax hf import HF_DIR OUT [--dtype float32|bfloat16]` and `llm-jax hf export WORKDIR_OR_EXPORT OUT`.

Import: a local Hugging Face model folder (config.json, safetensors weights, tokenizer files) becomes
an `llm-jax export` directory, which init_from=, generate, eval, predict and quantize read like any
other. Export: a run's newest checkpoint (or a float export) becomes a folder that transformers'
AutoModelForCausalLM (or the family's Auto class) and AutoTokenizer load with no extra code. The work
is in llm_jax/hf/convert.py; a model with no faithful mapping is one line, exit 2.
"""

from __future__ import annotations

from typing import Any

from llm_jax.hf import convert


def hf_import(hf_dir: str, out: str, dtype: str | None = None) -> dict[str, Any]:
    summary = convert.import_hf(hf_dir, out, dtype=dtype)
    return {key: summary[key] for key in ("out", "model_type", "dtype", "params", "tokenizer")}


def hf_export(src: str, out: str) -> dict[str, Any]:
    return convert.export_hf(src, out)
