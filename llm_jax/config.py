"""Run configuration: one frozen dataclass per concern, YAML presets and dotted overrides.

The built-in defaults are the main job (a small decoder LM on the embedded default corpus).
Every error a user can make in a config is a `ConfigError` with one line naming the key; the
CLI turns it into exit code 2 before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from llm_jax.models.families import FAMILIES, Family


class ConfigError(ValueError):
    """A config the run cannot use. The message is one line naming the key."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the model sees; nothing else reaches the Linen modules."""

    arch: str = "gpt2"  # a family of models/families.py: gpt2 | llama
    vocab_size: int = 2048
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (multi-head); fewer: grouped-query attention
    d_ff: int = 1024
    max_len: int = 1024  # longest sequence the learned position table supports
    position: str | None = None  # learned | sinusoidal | rope; None: the family's (gpt2 learned, llama rope)
    tie_embeddings: bool | None = None  # None: the family's (gpt2 tied, llama untied)
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    scan_layers: bool = False  # one compiled layer body, looped with nn.scan
    remat: str = "none"  # none | full | dots: what the backward pass recomputes
    # xla (explicit; fused C++ kernel on one CPU device) | cudnn (jax.nn.dot_product_attention) | splash (Pallas, TPU)
    attention: str = "xla"

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def family(self) -> Family:
        return FAMILIES[self.arch]

    @property
    def resolved_position(self) -> str:
        return self.family.position if self.position is None else self.position

    @property
    def resolved_tie_embeddings(self) -> bool:
        return self.family.tie_embeddings if self.tie_embeddings is None else self.tie_embeddings


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    path: str = ""  # an existing SentencePiece .model; empty: train one on the corpus
    model_type: str = "bpe"  # bpe | unigram
    sample_bytes: int = 4_000_000  # training input is a sample of the corpus of about this size
    byte_fallback: bool = True  # characters outside the vocabulary become byte pieces, never <unk>
    # Pieces that are always one token and never split (e.g. ["<|user|>", "<|end|>"]); their ids follow
    # pad/unk/bos/eos in the order given.
    user_defined_symbols: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One source of a `data.source=mixture` run. The other data.* settings apply to all sources."""

    source: str = "text"  # default | text | jsonl | tfds
    path: str = ""  # a glob of local files (text, jsonl)
    text_key: str = "text"  # the JSON field (jsonl) or the TFDS feature (tfds) holding the text
    tfds_name: str = ""
    tfds_data_dir: str = ""
    tfds_train_split: str = "train"
    tfds_eval_split: str = "validation"
    weight: float = 1.0  # share of the documents drawn from this source, relative to the others


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "default"  # default | text | jsonl | tfds
    path: str = ""  # a glob of local files (text, jsonl)
    text_key: str = "text"  # the JSON field holding the text (jsonl)
    tfds_name: str = ""  # a TFDS catalog name, e.g. "lm1b" or "lm1b:1.1.0"
    tfds_data_dir: str = ""  # local or gs:// data dir for tfds; empty: the TFDS default
    tfds_train_split: str = "train"
    tfds_eval_split: str = "validation"
    prepared_dir: str = ""  # where local corpora are prepared as TFDS datasets; empty: a user cache
    eval_fraction: float = 0.02  # share of local documents held out for evaluation
    shuffle: bool = True
    # Pieces of documents are mixed in a window this large before packing, so that one batch holds
    # pieces of many documents rather than consecutive pieces of one long file (one window per
    # virtual shard).
    shuffle_window: int = 2048
    text_unit: str = "file"  # file | line: what one document is in a text corpus
    # A local document with a line longer than this many bytes (minified code, base64 blobs) is skipped
    # and counted; 0: no limit.
    max_line_bytes: int = 100_000
    num_shards: int = 0  # ArrayRecord files per prepared split; 0: by size (64 MB to 1 GiB each)
    mixture: tuple[MixtureSource, ...] = ()  # the sources of data.source=mixture, with their weights
    workers: int = 0  # worker processes that tokenize and cut documents; 0: in this process
    prefetch: int = 2  # steps' batches made ahead in a background thread
    # Shards of the document stream that feed train.batch_size / virtual_shards rows each; fixed for a
    # run, so that its batches do not depend on the processes or workers. 0: gcd(train.batch_size, 8).
    # A process runs the shards of the rows it holds: on many hosts, a multiple of their count is best.
    virtual_shards: int = 0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # adamw | lamb
    lr: float = 2e-3  # peak learning rate, reached after warmup
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at decay_steps
    decay_steps: int = 0  # length of the schedule; 0: train.steps (set it to extend a run unchanged)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    # Decays matmul kernels and token embeddings; not norm scales, biases or learned position
    # embeddings (optim.NO_DECAY_NAMES says why).
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    grad_accum: int = 1  # micro-batches per update; train.batch_size is split among them


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # global, in sequences
    seq_len: int = 128
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    sample_prompt: str = "def "
    sample_tokens: int = 80
    temperature: float = 0.8
    top_k: int = 40
    progress: bool = True  # console progress bar
    # A step whose loss or gradient is NaN/Inf is skipped (params unchanged); this many in a row
    # stop the run without saving them. 0: never stop.
    max_nonfinite_steps: int = 10
    # With several processes, they agree on stopping (a signal) and time-based saves every this many
    # steps; the host reads each answer one agreement later, so it never waits on the device for
    # it. A signal then stops all processes at the same step within 2 x agree_every steps.
    agree_every: int = 10


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    keep: int = 3  # the newest checkpoints kept
    async_save: bool = True
    every_minutes: float = 0.0  # also save when this much time has passed since the last save; 0: off
    keep_best: bool = False  # also keep the checkpoint of the lowest eval loss (every eval step is saved)
    # A run refuses to start below a step set aside in damaged_checkpoints/ (from an older checkpoint,
    # or from step 0 when none is left): training would be lost without a word. true: start anyway.
    ignore_damaged: bool = False


# Logical axis name -> mesh axis (or axes). Data, not code: a new layout is a config change.
DEFAULT_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("length", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices left after the other axes
    fsdp: int = 1
    tensor: int = 1
    axis_rules: tuple[tuple[str, Any], ...] = DEFAULT_AXIS_RULES


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    mode: str = "jit"  # jit (sharded over the mesh) | pmap (replicated data parallel)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator: str = ""  # host:port of process 0; empty: auto-detect or single process
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/default"
    seed: int = 0
    init_from: str = ""  # an `llm-jax export` directory: start from its parameters (fresh optimizer, step 0)
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    parallel: ParallelConfig = ParallelConfig()
    distributed: DistributedConfig = DistributedConfig()


CHOICES = {
    "model.arch": tuple(FAMILIES),
    "model.position": ("learned", "sinusoidal", "rope", None),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots"),
    "model.attention": ("xla", "cudnn", "splash"),
    "tokenizer.model_type": ("bpe", "unigram"),
    "data.source": ("default", "text", "jsonl", "tfds", "mixture"),
    "data.text_unit": ("file", "line"),
    "optimizer.name": ("adamw", "lamb"),
    "parallel.mode": ("jit", "pmap"),
}


# ----------------------------------------------------------------------------- building


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config, e.g. 'model.n_layers'."""
    keys = []
    for f in dataclasses.fields(cls):
        ftype = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            keys += all_keys(ftype, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, siblings: typing.Sequence[str] = ()) -> ConfigError:
    """`siblings`: the valid keys beside `key`, for keys inside list entries (e.g. data.mixture.0.path)."""
    close = difflib.get_close_matches(key, [*all_keys(), *siblings], n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; run with a valid dotted key such as 'train.steps'"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, ftype: Any) -> Any:
    """Checks `value` against the annotated type; ints are accepted where floats are."""
    origin = typing.get_origin(ftype)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(ftype)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        allowed = " or ".join("null" if a is type(None) else a.__name__ for a in args)
        raise ConfigError(f"config key '{key}' must be {allowed}, got {value!r}")
    if origin is tuple and dataclasses.is_dataclass(typing.get_args(ftype)[0]):
        return _coerce_entries(key, value, typing.get_args(ftype)[0])
    if origin is tuple and typing.get_args(ftype)[0] is str:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key '{key}' must be a list of strings, e.g. '[\"<a>\", \"<b>\"]', got {value!r}")
        return tuple(value)
    if origin is tuple:  # the axis rules: a list of [logical_name, mesh_axis or list or null]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in value
        ):
            raise ConfigError(f"config key '{key}' must be a list of [logical_axis, mesh_axis] pairs")
        return tuple((r[0], tuple(r[1]) if isinstance(r[1], list) else r[1]) for r in value)
    if ftype is bool:
        if isinstance(value, bool):
            return value
    elif ftype is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif ftype is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # No setting means anything as NaN or infinity, and NaN slips through every `x >= 0` check.
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
            return number
    elif ftype is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key '{key}' must be {ftype.__name__}, got {value!r}")


def _coerce_entries(key: str, value: Any, entry_type: type) -> tuple[Any, ...]:
    """A list of mappings (YAML), or {0: ..., 1: ...} from dotted overrides, as a tuple of `entry_type`."""
    if isinstance(value, dict) and all(str(k).isdigit() for k in value):
        indices = sorted(int(k) for k in value)
        if indices != list(range(len(indices))):
            raise ConfigError(f"config key '{key}': entries must be numbered 0, 1, 2, ... without gaps, got {indices}")
        value = [value[k] for k in sorted(value, key=lambda k: int(k))]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"config key '{key}' must be a list of mappings such as "
                          f"[{{source: text, path: 'a/*.txt', weight: 1}}], got {value!r}")
    return tuple(_build(entry_type, entry, f"{key}.{i}.") for i, entry in enumerate(value))


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        if name not in types_:
            while isinstance(value, dict) and len(value) == 1:  # name the whole dotted key in the error
                (name, value), = value.items()
                key += "." + str(name)
            raise _unknown_key(key, [prefix + n for n in types_])
        ftype = types_[name]
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give its keys, e.g. '{key}.<name>=...'")
            kwargs[name] = _build(ftype, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, ftype)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    for part in parts[:-1]:
        if isinstance(node, list):  # an entry of a list from the YAML file, e.g. data.mixture.1.weight
            index = _list_index(node, part, key)
            if index == len(node):
                node.append({})
            node = node[index]
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, (dict, list)):
            raise _unknown_key(key)
        node = child
    if isinstance(node, list):
        index = _list_index(node, parts[-1], key)
        node[index:index + 1] = [value]
    elif isinstance(node, dict):
        node[parts[-1]] = value
    else:
        raise _unknown_key(key)


def _list_index(entries: list, part: str, key: str) -> int:
    """The list position named by one part of a dotted key; one past the end appends an entry."""
    if not part.isdigit() or int(part) > len(entries):
        raise ConfigError(f"config key '{key}': '{part}' must be an entry number from 0 to {len(entries)}")
    return int(part)


def parse_override(text: str) -> tuple[str, Any]:
    """'train.steps=200' -> ('train.steps', 200). Values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"expected key=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"expected key=value, got '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping.

    Plain PyYAML keeps the last one silently, so a second `model:` section drops the whole first
    one. YAML merge keys (`<<: *base`) stay allowed: overriding a merged key is what they are for.
    """

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first_line
                except TypeError:  # an unhashable key: the base class names that error
                    continue
                line = key_node.start_mark.line + 1
                if seen:
                    raise _DuplicateKeyError(f"key '{key}' is given twice (lines {first_line[key]} and {line}); "
                                             "keep one, as the second would silently replace the first")
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- key=value overrides, validated. Raises ConfigError."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
        except _DuplicateKeyError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    config = _build(Config, tree)
    validate(config)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """Plain YAML-friendly dict (tuples become lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))


def dump_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


# ----------------------------------------------------------------------------- validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(c: Config) -> None:
    """Checks that need no devices. Device-dependent checks live in `validate_for_devices`."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(c, section), name)
        shown = ", ".join("null" if a is None else a for a in allowed)
        _require(value in allowed, f"config key '{key}' must be one of {shown}, got {value!r}")

    _require(bool(c.workdir.strip()), "config key 'workdir' must name a directory, got an empty string")

    m = c.model
    for key in ("vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "max_len"):
        _require(getattr(m, key) > 0, f"config key 'model.{key}' must be positive, got {getattr(m, key)}")
    _require(m.d_model % m.n_heads == 0,
             f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    _require(m.kv_heads > 0 and m.n_heads % m.kv_heads == 0,
             f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.kv_heads})")
    _require(m.resolved_position != "rope" or m.head_dim % 2 == 0,
             f"RoPE needs an even head dimension; model.d_model/model.n_heads = {m.head_dim}")
    for key in ("dtype", "param_dtype"):
        # float16 without loss scaling (which this trainer does not do) loses small gradients to
        # underflow without any error; bfloat16 has float32's range and the same memory.
        _require(getattr(m, key) != "float16",
                 f"model.{key}=float16 needs loss scaling, which llm_jax does not do (small gradients would "
                 f"silently underflow to zero); use model.{key}=bfloat16")
    _require(0.0 <= m.dropout < 1.0, f"config key 'model.dropout' must be in [0, 1), got {m.dropout}")
    tk = c.tokenizer
    # pad, unk, bos, eos, then the user's symbols, then 256 byte pieces with byte fallback.
    needed = 4 + len(tk.user_defined_symbols) + (256 if tk.byte_fallback else 0)
    _require(m.vocab_size >= needed or bool(tk.path),
             f"model.vocab_size ({m.vocab_size}) must be at least {needed} to train a tokenizer with "
             f"{len(tk.user_defined_symbols)} user-defined symbols"
             + (" and byte fallback" if tk.byte_fallback else ""))
    _require(all(tk.user_defined_symbols) and len(set(tk.user_defined_symbols)) == len(tk.user_defined_symbols),
             "config key 'tokenizer.user_defined_symbols' must list distinct, non-empty strings")

    t = c.train
    for key in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches"):
        _require(getattr(t, key) > 0, f"config key 'train.{key}' must be positive, got {getattr(t, key)}")
    _require(t.seq_len <= m.max_len or m.resolved_position != "learned",
             f"train.seq_len ({t.seq_len}) exceeds model.max_len ({m.max_len}) of the learned positions")
    _require(m.attention != "splash" or t.seq_len % 128 == 0,
             f"model.attention=splash needs train.seq_len to be a multiple of 128, got {t.seq_len}")
    _require(t.top_k >= 0, f"config key 'train.top_k' must be >= 0, got {t.top_k}")
    _require(t.temperature >= 0, f"config key 'train.temperature' must be >= 0, got {t.temperature}")

    o = c.optimizer
    _require(o.lr > 0, f"config key 'optimizer.lr' must be positive, got {o.lr}")
    _require(o.warmup_steps >= 0, f"config key 'optimizer.warmup_steps' must be >= 0, got {o.warmup_steps}")
    _require(o.decay_steps >= 0, f"config key 'optimizer.decay_steps' must be >= 0, got {o.decay_steps}")
    _require(o.grad_accum >= 1, f"config key 'optimizer.grad_accum' must be >= 1, got {o.grad_accum}")
    _require(t.batch_size % o.grad_accum == 0,
             f"train.batch_size ({t.batch_size}) must be divisible by optimizer.grad_accum ({o.grad_accum})")
    _require(o.clip_norm >= 0, f"config key 'optimizer.clip_norm' must be >= 0, got {o.clip_norm}")
    _require(o.weight_decay >= 0, f"config key 'optimizer.weight_decay' must be >= 0, got {o.weight_decay}")
    _require(0 <= o.min_lr_ratio <= 1, f"config key 'optimizer.min_lr_ratio' must be in [0, 1], got {o.min_lr_ratio}")
    for key in ("b1", "b2"):
        _require(0 <= getattr(o, key) < 1, f"config key 'optimizer.{key}' must be in [0, 1), got {getattr(o, key)}")
    _require(o.eps > 0, f"config key 'optimizer.eps' must be positive, got {o.eps}")

    k = c.checkpoint
    _require(k.every > 0, f"config key 'checkpoint.every' must be positive, got {k.every}")
    _require(k.keep > 0, f"config key 'checkpoint.keep' must be positive, got {k.keep}")
    _require(k.every_minutes >= 0, f"config key 'checkpoint.every_minutes' must be >= 0, got {k.every_minutes}")
    _require(t.agree_every > 0, f"config key 'train.agree_every' must be positive, got {t.agree_every}")
    _require(t.max_nonfinite_steps >= 0,
             f"config key 'train.max_nonfinite_steps' must be >= 0, got {t.max_nonfinite_steps}")

    _require(c.tokenizer.sample_bytes > 0,
             f"config key 'tokenizer.sample_bytes' must be positive, got {c.tokenizer.sample_bytes}")

    d = c.data
    _require(d.source not in ("text", "jsonl") or bool(d.path),
             f"data.source={d.source} needs data.path (a glob of files)")
    _require(d.source != "tfds" or bool(d.tfds_name), "data.source=tfds needs data.tfds_name")
    _require(d.shuffle_window >= 1, f"config key 'data.shuffle_window' must be >= 1, got {d.shuffle_window}")
    _require(0.0 < d.eval_fraction < 1.0, f"config key 'data.eval_fraction' must be in (0, 1), got {d.eval_fraction}")
    for key in ("max_line_bytes", "num_shards", "workers", "prefetch", "virtual_shards"):
        _require(getattr(d, key) >= 0, f"config key 'data.{key}' must be >= 0, got {getattr(d, key)}")
    _require(d.virtual_shards == 0 or t.batch_size % d.virtual_shards == 0,
             f"data.virtual_shards ({d.virtual_shards}) must divide train.batch_size ({t.batch_size})")
    _require(d.source == "mixture" or not d.mixture,
             f"data.mixture is set but data.source={d.source}; use data.source=mixture to train on the mixture")
    _require(d.source != "mixture" or bool(d.mixture),
             "data.source=mixture needs data.mixture, a list of {source, path, weight, ...} entries")
    for i, entry in enumerate(d.mixture):
        key = f"data.mixture.{i}"
        _require(entry.source in ("default", "text", "jsonl", "tfds"),
                 f"config key '{key}.source' must be one of default, text, jsonl, tfds, got {entry.source!r}")
        _require(entry.source not in ("text", "jsonl") or bool(entry.path),
                 f"{key}.source={entry.source} needs {key}.path (a glob of files)")
        _require(entry.source != "tfds" or bool(entry.tfds_name), f"{key}.source=tfds needs {key}.tfds_name")
        _require(entry.weight > 0, f"config key '{key}.weight' must be positive, got {entry.weight}")

    for axis in ("data", "fsdp", "tensor"):
        size = getattr(c.mesh, axis)
        _require(size == -1 or size > 0, f"config key 'mesh.{axis}' must be positive or -1, got {size}")
    _require([c.mesh.data, c.mesh.fsdp, c.mesh.tensor].count(-1) <= 1,
             "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")

    # pmap replicates the whole state on every device: there is nothing to shard over fsdp or tensor.
    _require(c.parallel.mode == "jit" or (c.mesh.fsdp == 1 and c.mesh.tensor == 1),
             f"parallel.mode=pmap replicates the state over all devices: mesh.fsdp and mesh.tensor must be 1, "
             f"got {c.mesh.fsdp} and {c.mesh.tensor}")

    dist = c.distributed
    _require(dist.num_processes is None or dist.num_processes > 0,
             f"config key 'distributed.num_processes' must be positive, got {dist.num_processes}")
    if dist.process_id is not None and dist.num_processes is not None:
        _require(0 <= dist.process_id < dist.num_processes,
                 f"distributed.process_id ({dist.process_id}) must be in [0, {dist.num_processes})")


def validate_for_devices(c: Config, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 mesh axes for `num_devices` and checks that the batch and heads divide.

    Returns the (data, fsdp, tensor) mesh shape.
    """
    sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    known = 1
    for s in sizes:
        if s != -1:
            known *= s
    if -1 in sizes:
        _require(num_devices % known == 0,
                 f"mesh axes {known} do not divide the {num_devices} devices (mesh.data/fsdp/tensor)")
        sizes[sizes.index(-1)] = num_devices // known
    data, fsdp, tensor = sizes
    _require(data * fsdp * tensor == num_devices,
             f"mesh.data*mesh.fsdp*mesh.tensor = {data}*{fsdp}*{tensor} must equal the {num_devices} devices")
    m, t = c.model, c.train
    _require(m.n_heads % tensor == 0, f"model.n_heads ({m.n_heads}) must be divisible by mesh.tensor ({tensor})")
    _require(m.kv_heads % tensor == 0,
             f"model.n_kv_heads ({m.kv_heads}) must be divisible by mesh.tensor ({tensor})")
    per_update = t.batch_size // c.optimizer.grad_accum
    batch_shards = data * fsdp if c.parallel.mode == "jit" else num_devices
    _require(per_update % batch_shards == 0,
             f"train.batch_size/optimizer.grad_accum ({per_update}) must be divisible by the "
             f"{batch_shards} batch shards (mesh.data*mesh.fsdp)")
    return data, fsdp, tensor
