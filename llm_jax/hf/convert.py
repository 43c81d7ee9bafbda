"""`llm-jax hf import` and `hf export`: a Hugging Face folder <-> an llm_jax export, for every family.

Import (`import_hf`): config.json's model_type picks the family module (gpt2.py, llama.py, bert.py,
t5.py: the one whose MODEL_TYPES has it), which maps the config to our `model.*` keys and the
tensors to our unscanned parameter tree, one tensor read at a time (safetensors_io.py). The tree is
checked against the shapes our model would create (jax.eval_shape of its init), cast to the stored
dtype (`--dtype`, default float32) and written as an ordinary `llm-jax export` (train/checkpoint.py:
params/, config.yaml, tokenizer/, export.json with "source": "huggingface"), so init_from=, generate,
eval, predict and quantize read it like any other. Every tensor of the folder must be used: one the
mapping leaves over means the config describes another model, which is refused rather than dropped.

Export (`export_hf`): the newest checkpoint of a run, or a float export (a pruned one included; an
int8 one is refused: its dequantized weights would not be the model that was evaluated), is written as
config.json (every convention explicit, from the family module), model.safetensors in the stored
dtype, generation_config.json (bos/eos/pad of the tokenizer) and the tokenizer in transformers' form.
A scanned run (`model.scan_layers`) is restored layer by layer (layer_0, layer_1, ...), as a resume
with scan_layers flipped would be. Both directions
write beside OUT and rename into place, so an interrupted conversion leaves nothing that looks done.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import ml_dtypes
import numpy as np

from llm_jax.config import Config, ConfigError, ModelConfig, TrainConfig, load_config, validate
from llm_jax.hf import safetensors_io, tokenizer_files
from llm_jax.hf.errors import HFConversionError

FAMILY_MODULES = ("gpt2", "llama", "bert", "t5")  # llm_jax.hf.<name>, each mapping one family
STORED_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


# ----------------------------------------------------------------------------- family modules


def _module(name: str) -> ModuleType | None:
    """llm_jax.hf.<name>, or None when this installation has no mapping of that family."""
    try:
        return importlib.import_module(f"llm_jax.hf.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"llm_jax.hf.{name}":
            return None
        raise


def module_for_model_type(model_type: Any) -> ModuleType:
    """The family module that imports config.json's model_type."""
    known = []
    for name in FAMILY_MODULES:
        module = _module(name)
        if module is None:
            continue
        if model_type in module.MODEL_TYPES:
            return module
        known += module.MODEL_TYPES
    raise HFConversionError(f"config.json: model_type={model_type!r} is not supported; llm_jax imports "
                            f"{', '.join(known)}")


def module_for_arch(arch: str) -> ModuleType:
    module = _module(arch) if arch in FAMILY_MODULES else None
    if module is None:
        raise HFConversionError(f"model.arch={arch} has no Hugging Face mapping in this installation")
    return module


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / HF_CONFIG
    if not path.is_file():
        raise HFConversionError(f"{hf_dir} is not a Hugging Face model folder (no {HF_CONFIG})")
    try:
        hf = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise HFConversionError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise HFConversionError(f"{path} must hold a JSON object")
    return hf


# ----------------------------------------------------------------------------- import


def import_hf(hf_dir: str | Path, out: str | Path, dtype: str | None = None) -> dict[str, Any]:
    """Writes the Hugging Face model folder `hf_dir` as an llm_jax export at `out` (a new directory);
    returns a summary. `dtype`: the stored dtype of the parameters (float32, the default, or bfloat16)."""
    from llm_jax.data.tokenizer import load_run_tokenizer
    from llm_jax.models.decoder import count_params
    from llm_jax.train import checkpoint as ckpt

    hf_dir, out = Path(hf_dir), Path(out).absolute()
    ckpt.check_out(out)
    dtype = dtype or "float32"
    if dtype not in STORED_DTYPES:
        raise HFConversionError(f"--dtype must be one of {', '.join(STORED_DTYPES)}, got {dtype!r}")
    hf = read_hf_config(hf_dir)
    module = module_for_model_type(hf.get("model_type"))
    model = ModelConfig(**module.model_keys_from_hf(hf), param_dtype=dtype)
    config = imported_config(model, out, getattr(module, "run_keys_from_hf", lambda hf: {})(hf))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        tokenizer_files.import_tokenizer(hf_dir, tokenizer_dir)  # refuses a folder with none
        config = _with_the_tokenizers_sentinels(config, tokenizer_dir)
        load_run_tokenizer(config, tmp)  # refuses one this model cannot use (vocabulary, bos/eos), as generate would
        with safetensors_io.WeightReader(hf_dir) as weights:

            def read(name: str) -> np.ndarray:  # cast as read: never the checkpoint's and the stored dtype's copy both
                return np.asarray(weights.read(name), STORED_DTYPES[dtype])

            try:
                params = module.params_from_hf(model, read, weights.names)
            except ValueError as e:  # a tensor whose size does not fit config.json (reshape)
                raise HFConversionError(f"{hf_dir}: the weights do not fit {HF_CONFIG}: {e}") from e
            _check_all_used(hf_dir, weights, model, getattr(module, "IGNORED_SUFFIXES", ()))
        check_tree(model, params, hf_dir)
        info = {"source": "huggingface", "model_type": hf.get("model_type"),
                "architectures": hf.get("architectures"), "hf_dir": str(hf_dir.absolute()), "dtype": dtype,
                "params": count_params(params), "step": 0,
                "tokenizer": sorted(p.name for p in tokenizer_dir.iterdir())}
        # numpy arrays, written by orbax as they are: no second copy of the model on a device
        path = ckpt.export_params(out, params, config, tokenizer_dir, info)
    return {**info, "out": str(path)}


def imported_config(model: ModelConfig, out: Path, run_keys: Mapping[str, Any]) -> Config:
    """The config.yaml of an imported model: the defaults around its model, a train.seq_len its learned
    positions hold, and the family's other keys (`run_keys`, dotted, e.g. tokenizer.extra_ids)."""
    config = Config(workdir=str(out), model=model,
                    train=dataclasses.replace(TrainConfig(), seq_len=min(TrainConfig.seq_len, model.max_len)))
    for key, value in run_keys.items():
        section, name = key.split(".")
        config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section),
                                                                             **{name: value})})
    validate(config)
    return config


def _with_the_tokenizers_sentinels(config: Config, tokenizer_dir: Path) -> Config:
    """An encoder-decoder's span corruption uses the tokenizer's sentinels: tokenizer.extra_ids says how
    many there are (100 in T5's tokenizers; other counts exist), so the imported config takes the count
    the tokenizer has rather than the default."""
    from llm_jax.data.tokenizer import open_tokenizer

    if not config.model.family.encoder_decoder:
        return config
    count = len(open_tokenizer(tokenizer_dir).sentinel_ids)
    if count == 0 or count == config.tokenizer.extra_ids:
        return config
    config = dataclasses.replace(config, tokenizer=dataclasses.replace(config.tokenizer, extra_ids=count))
    validate(config)
    return config


def _check_all_used(hf_dir: Path, weights: safetensors_io.WeightReader, model: ModelConfig,
                    ignored: tuple[str, ...]) -> None:
    """Refuses tensors the mapping left: the config describes another model than the weights."""
    left = sorted(name for name in weights.names - weights.read_names
                  if not name.endswith(ignored)
                  and not (name == "lm_head.weight" and model.resolved_tie_embeddings))  # a copy of the embedding
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise HFConversionError(f"{hf_dir}: tensor {left[0]!r}{more} has no place in the model {HF_CONFIG} "
                                "describes")


def check_tree(model: ModelConfig, params: dict[str, Any], where: Path) -> None:
    """The converted tree against the one our model creates (names and shapes), without computing it."""
    from llm_jax.models.build import init_inputs, make_model
    from llm_jax.train import checkpoint_tree

    unscanned = dataclasses.replace(model, scan_layers=False)
    tokens, kwargs = init_inputs(unscanned, 1)
    abstract = jax.eval_shape(lambda: make_model(unscanned).init(jax.random.key(0), tokens, **kwargs))
    expected = {path: tuple(leaf.shape) for path, leaf in
                checkpoint_tree.flat(_unboxed(abstract)["params"]).items()}
    got = {path: tuple(np.shape(leaf)) for path, leaf in checkpoint_tree.flat(params).items()}
    for path in sorted(set(expected) | set(got)):
        name = "/".join(path)
        if path not in got:
            raise HFConversionError(f"{where}: the conversion gives no {name} {expected[path]}")
        if path not in expected:
            raise HFConversionError(f"{where}: the conversion gives {name}, which the model has not")
        if got[path] != expected[path]:
            raise HFConversionError(f"{where}: {name} is {got[path]} in the weights, {expected[path]} in the "
                                    f"model {HF_CONFIG} describes")


def _unboxed(tree: Any) -> Any:
    import flax.linen as nn

    return nn.unbox(tree)


# ----------------------------------------------------------------------------- export


def export_hf(src: str | Path, out: str | Path) -> dict[str, Any]:
    """Writes a run's newest checkpoint (or a float export) as a Hugging Face folder at `out` (a new
    directory) that transformers' Auto classes load with no extra code; returns a summary."""
    from llm_jax.commands.export import restore_run  # the run or export reader every command shares
    from llm_jax.train import checkpoint as ckpt
    from llm_jax.train import exported

    src, out = Path(src), Path(out).absolute()
    ckpt.check_out(out)
    if exported.is_export(src) and "quantization" in ckpt.export_info(src):
        raise HFConversionError(f"{src} holds int8 weights (llm-jax quantize); export the float run or export "
                                "it came from")
    if not (src / "config.yaml").is_file():
        raise ConfigError(f"{src} is neither a run directory nor an llm-jax export (no config.yaml)")
    saved = load_config(src / "config.yaml", [f"workdir={src}", "init_from="])  # refusals before any weight is read
    if saved.task.kind != "lm":
        raise HFConversionError(f"{src} is a task.kind={saved.task.kind} run (a task head); hf export writes "
                                "language models")
    module = module_for_arch(saved.model.arch)
    hf_config = module.hf_config_from_model(saved.model)
    # Layer by layer, as transformers names them: the restore relayouts a scanned run's stacked layers.
    config, params, step = restore_run(src, overrides=("model.scan_layers=false",))
    params = host_tree(jax.device_get(params))
    # The tokenizer's ids win over a family's defaults; an id the tokenizer lacks is left to the family.
    special = {key: value for key, value in _special_ids(config, src).items() if value is not None}
    # "dtype" for transformers 5, "torch_dtype" for the versions before it (5 reads it without a warning)
    hf_config = {**hf_config, **special, "dtype": config.model.param_dtype, "torch_dtype": config.model.param_dtype}
    return write_hf(out, module, config, params, hf_config, src / "tokenizer", step)


def write_hf(out: Path, module: ModuleType, config: Config, params: dict[str, Any], hf_config: dict[str, Any],
             tokenizer_dir: Path, step: int) -> dict[str, Any]:
    """Writes config.json, model.safetensors, generation_config.json and the tokenizer beside `out`, then
    renames the folder into place. generation_config.json holds the special ids of config.json (transformers
    reads generate's defaults from it alone when it exists, so it repeats an encoder-decoder's start id)."""
    from llm_jax.train import checkpoint as ckpt

    generation = {key: hf_config[key] for key in GENERATION_KEYS if hf_config.get(key) is not None}
    with ckpt.directory_in_place(out) as tmp:
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        count = safetensors_io.write_weights(tmp / safetensors_io.WEIGHTS, module.params_to_hf(config.model, params))
        if generation:
            (tmp / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer_files.export_tokenizer(tokenizer_dir, tmp, config.model)
    return {"out": str(out), "architecture": hf_config["architectures"][0], "model_type": hf_config["model_type"],
            "tensors": count, "dtype": config.model.param_dtype, "step": step}


def _special_ids(config: Config, src: Path) -> dict[str, int | None]:
    """bos/eos/pad ids of the run's tokenizer for config.json and generation_config.json (None: absent)."""
    from llm_jax.data.tokenizer import load_run_tokenizer

    tokenizer = load_run_tokenizer(config, src)
    ids = {}
    for name in ("bos", "eos", "pad"):
        value = None if tokenizer is None else getattr(tokenizer, f"{name}_id", None)
        ids[f"{name}_token_id"] = None if value is None or value < 0 else int(value)
    return ids


def host_tree(tree: Any) -> Any:
    """Nested mappings (FrozenDicts included) as dicts of numpy arrays."""
    if isinstance(tree, Mapping):
        return {str(k): host_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


