"""Hugging Face interop: `llm-jax hf import` (a transformers model folder -> an llm_jax export) and
`llm-jax hf export` (a run or an export -> a folder `transformers` loads with no extra code).

One module per family maps config.json and the tensor names both ways (gpt2.py, llama.py, bert.py,
t5.py), each with the same four functions:

    MODEL_TYPES: tuple[str, ...]   config.json "model_type" values the module imports
    ARCHITECTURE: str              the class an exported config.json names in "architectures"
    model_keys_from_hf(hf: dict) -> dict          config.json -> our `model.*` keys (arch included)
    hf_config_from_model(model: ModelConfig) -> dict   -> a complete config.json, every convention explicit
    params_from_hf(model, read, names) -> dict    our unscanned parameter tree (nested dicts of numpy
                                                  arrays), one tensor read at a time with read(name)
    params_to_hf(model, params) -> Iterator[(name, np.ndarray)]   the tensors of HF's state_dict

A config or a model with no faithful mapping raises HFConversionError naming the field.
"""
