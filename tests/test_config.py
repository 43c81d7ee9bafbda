from pathlib import Path

import pytest
import yaml

from llm_jax.config import (
    Config,
    ConfigError,
    all_keys,
    dump_config,
    load_config,
    validate_for_devices,
)

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
CONTRACT_KEYS = [
    "workdir", "seed", "train.steps", "train.batch_size", "train.seq_len", "train.log_every",
    "train.eval_every", "checkpoint.every", "checkpoint.keep", "optimizer.name", "optimizer.lr", "model.arch",
    "model.n_layers", "model.d_model", "model.n_heads", "model.n_kv_heads", "model.d_ff", "model.vocab_size",
    "model.dtype", "model.param_dtype", "mesh.data", "mesh.fsdp", "mesh.tensor", "parallel.mode", "data.source",
    "data.path", "data.text_key", "data.tfds_name", "distributed.coordinator", "distributed.num_processes",
    "distributed.process_id",
]


def test_defaults_are_valid_and_have_every_contract_key():
    config = load_config()
    assert config == Config()
    missing = set(CONTRACT_KEYS) - set(all_keys())
    assert not missing


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_yaml_parses(path):
    config = load_config(path)
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        if not isinstance(values, dict):  # a top-level key: workdir, seed, init_from
            assert getattr(config, section) == values, section
            continue
        for key, value in values.items():
            got = getattr(getattr(config, section), key)
            assert got == value or (isinstance(got, float) and got == pytest.approx(value)), f"{section}.{key}"


def test_shipped_configs_exist():
    assert len(CONFIGS) >= 3


def test_overrides_are_yaml_scalars():
    config = load_config(None, ["train.steps=7", "optimizer.lr=1e-3", "model.arch=llama", "model.n_kv_heads=2",
                                "train.progress=false", "workdir=/tmp/x"])
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.optimizer.lr == 1e-3
    assert config.model.arch == "llama" and config.model.n_kv_heads == 2
    assert config.model.resolved_position == "rope" and config.model.resolved_tie_embeddings is False
    assert config.train.progress is False
    assert config.workdir == "/tmp/x"


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n  seq_len: 32\n")
    config = load_config(path, ["train.steps=9"])
    assert (config.train.steps, config.train.seq_len) == (9, 32)


@pytest.mark.parametrize("override, fragment", [
    ("model.n_layrs=2", "did you mean 'model.n_layers'"),
    ("trian.steps=2", "did you mean 'train.steps'"),
    ("train.steps=abc", "'train.steps' must be int"),
    ("train.steps=1.5", "'train.steps' must be int"),
    ("model.dropout=yes", "'model.dropout' must be float"),
    ("model.n_heads=3", "divisible by model.n_heads"),
    ("model.n_kv_heads=3", "divisible by model.n_kv_heads"),
    ("model.n_heads=3 model.head_dim=64", None),
    ("model.head_dim=0", "'model.head_dim' must be positive"),
    ("model.max_documents_per_row=0", "'model.max_documents_per_row' must be positive"),
    ("model.arch=llama model.head_dim=15", "RoPE needs an even head dimension; the head dimension is 15"),
    ("optimizer.name=sgd", "one of adamw, lamb"),
    ("model.arch=t6", "one of gpt2, llama, bert, t5"),
    ("train.steps=0", "'train.steps' must be positive"),
    ("optimizer.grad_accum=3", "divisible by optimizer.grad_accum"),
    ("data.source=text", "needs data.path"),
    ("model=3", "is a section"),
    ("train.seq_len=2048", "exceeds model.max_len"),
    ("parallel.mode=pmap mesh.fsdp=2", "mesh.fsdp and mesh.tensor must be 1"),
    ("mesh.data=-1", None),
    ("train.objective=mlm", "train.objective=mlm cannot train model.arch=gpt2, which learns clm"),
    ("model.arch=bert train.objective=clm", "train.objective=clm cannot train model.arch=bert, which learns mlm"),
    ("train.objective=span", "train.objective=span cannot train model.arch=gpt2, which learns clm"),
    ("train.objective=prefix", "one of clm, mlm, span, seq2seq, null"),
    ("model.arch=t5 train.objective=mlm", "which learns span or seq2seq"),
    ("model.arch=gpt2 model.position=relative", "model.position=relative does not fit model.arch=gpt2"),
    ("model.arch=t5 model.position=rope", "model.position=rope does not fit model.arch=t5"),
    ("model.arch=t5 model.attention=cudnn", "model.attention=cudnn does not fit model.arch=t5"),
    ("model.arch=t5 model.attention=splash train.seq_len=128", "model.attention=splash does not fit model.arch=t5"),
    ("train.target_len=16", "train.target_len is an encoder-decoder"),
    ("model.arch=t5 train.target_len=2", "train.target_len (2) must be at least 3 for span corruption"),
    ("model.arch=t5 train.target_len=3", None),
    ("model.arch=t5 train.objective=seq2seq train.target_len=2", None),
    ("model.arch=t5 tokenizer.extra_ids=0", "tokenizer.extra_ids must be positive"),
    ("model.arch=t5 model.n_decoder_layers=0", "model.n_decoder_layers' must be positive"),
    ("model.activation=tanh", "one of gelu_tanh, gelu, silu, relu, null"),
    ("model.arch=bert train.objective=mlm", None),
    ("finetune.freeze=layers:x", "layers:N with N a positive integer"),
    ("finetune.freeze=top", "one of none, embeddings, body, layers:N"),
    ("finetune.freeze=layers:5", "freezes more blocks than the model's 4"),
    ("finetune.freeze=layers:1 model.scan_layers=true", "set model.scan_layers=false"),
    ("finetune.freeze=body", "task.kind=lm has no task head"),
    ("finetune.layer_decay=0", "'finetune.layer_decay' must be in (0, 1]"),
    ("finetune.freeze=layers:2 finetune.layer_decay=0.8", None),
    ("distill.alpha=1.5", "'distill.alpha' must be in [0, 1]"),
    ("distill.temperature=0", "'distill.temperature' must be positive"),
    ("distill.teacher=x parallel.mode=pmap", "distill.teacher needs parallel.mode=jit"),
])
def test_config_errors_are_one_line(override, fragment):
    if fragment is None:
        load_config(None, override.split())
        return
    with pytest.raises(ConfigError) as info:
        load_config(None, override.split())
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("key", ["model.dtype", "model.param_dtype"])
def test_float16_without_loss_scaling_is_refused(key, capsys):
    with pytest.raises(ConfigError, match=f"{key}=float16 needs loss scaling.*use {key}=bfloat16"):
        load_config(None, [f"{key}=float16"])
    from llm_jax import cli

    assert cli.main(["train", f"{key}=float16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "loss scaling" in err and "\n" not in err


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_device_checks():
    config = load_config(None, ["mesh.fsdp=2", "mesh.tensor=2"])
    assert validate_for_devices(config, 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="must equal the 8 devices"):
        validate_for_devices(load_config(None, ["mesh.data=3"]), 8)
    with pytest.raises(ConfigError, match="divisible by mesh.tensor"):
        validate_for_devices(load_config(None, ["mesh.tensor=8"]), 8)
    with pytest.raises(ConfigError, match="batch shards"):
        validate_for_devices(load_config(None, ["train.batch_size=12"]), 8)


def test_dump_round_trips(tmp_path):
    config = load_config(None, ["model.arch=llama", "train.steps=3"])
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_data_mixture_from_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": "mixture", "mixture": [
        {"source": "text", "path": "books/*.txt", "weight": 3},
        {"source": "jsonl", "path": "web/*.jsonl", "text_key": "body"},
    ]}}))
    config = load_config(path, ["data.mixture.1.weight=0.5", "data.mixture.2.source=tfds",
                                "data.mixture.2.tfds_name=lm1b"])
    mixture = config.data.mixture
    assert [(m.source, m.weight) for m in mixture] == [("text", 3.0), ("jsonl", 0.5), ("tfds", 1.0)]
    assert mixture[1].text_key == "body" and mixture[2].tfds_name == "lm1b"
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    # Only dotted keys, no YAML file: entries are numbered.
    dotted = load_config(None, ["data.source=mixture", "data.mixture.0.path=a/*.txt", "data.mixture.1.path=b/*.txt",
                                "data.mixture.1.weight=2"])
    assert [(m.path, m.weight) for m in dotted.data.mixture] == [("a/*.txt", 1.0), ("b/*.txt", 2.0)]


@pytest.mark.parametrize("overrides, fragment", [
    (["data.source=mixture"], "needs data.mixture"),
    (["data.mixture.0.path=a/*.txt"], "use data.source=mixture"),
    (["data.source=mixture", "data.mixture.0.pth=a"], "did you mean 'data.mixture.0.path'"),
    (["data.source=mixture", "data.mixture.1.path=a"], "numbered 0, 1, 2"),
    (["data.source=mixture", "data.mixture.0.source=jsonl"], "data.mixture.0.source=jsonl needs data.mixture.0.path"),
    (["data.source=mixture", "data.mixture.0.path=a", "data.mixture.0.weight=0"], "must be positive"),
    (["data.mixture=3"], "must be a list of mappings"),
    (["data.workers=-1"], "data.workers"),
    (["data.text_unit=page"], "data.text_unit"),
    (["tokenizer.user_defined_symbols=[a, a]"], "distinct"),
    (["tokenizer.user_defined_symbols=a"], "must be a list of strings"),
    (["model.vocab_size=262", "tokenizer.user_defined_symbols=[x, y, z]"], "at least 263"),
])
def test_data_and_tokenizer_errors_are_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert load_config(None, ["model.vocab_size=100", "tokenizer.byte_fallback=false"]).model.vocab_size == 100


@pytest.mark.parametrize("text, fragment", [
    # A second section would silently replace the first, dropping every key of it.
    ("model:\n  n_layers: 2\ntrain:\n  steps: 5\nmodel:\n  d_model: 64\n",
     "key 'model' is given twice (lines 1 and 5)"),
    ("train:\n  steps: 5\n  steps: 7\n", "key 'steps' is given twice (lines 2 and 3)"),
])
def test_duplicate_keys_in_a_yaml_file_are_refused(tmp_path, text, fragment):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_yaml_merge_keys_may_override_merged_values(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("train:\n  <<: {steps: 5, seq_len: 32}\n  steps: 9\n")
    config = load_config(path)
    assert (config.train.steps, config.train.seq_len) == (9, 32)


@pytest.mark.parametrize("override, fragment", [
    ("workdir=", "'workdir' must name a directory"),
    ("workdir=' '", "'workdir' must name a directory"),
    ("optimizer.weight_decay=-0.1", "'optimizer.weight_decay' must be >= 0"),
    ("optimizer.min_lr_ratio=-1", "'optimizer.min_lr_ratio' must be in [0, 1]"),
    ("optimizer.min_lr_ratio=1.5", "'optimizer.min_lr_ratio' must be in [0, 1]"),
    ("optimizer.b2=1", "'optimizer.b2' must be in [0, 1)"),
    ("optimizer.eps=0", "'optimizer.eps' must be positive"),
    # NaN passes every `x >= 0` check; YAML spells it .nan, and 'nan' is read through float().
    ("optimizer.weight_decay=.nan", "'optimizer.weight_decay' must be a finite number"),
    ("optimizer.min_lr_ratio=nan", "'optimizer.min_lr_ratio' must be a finite number"),
    ("optimizer.lr=.inf", "'optimizer.lr' must be a finite number"),
    ("checkpoint.every_minutes=inf", "'checkpoint.every_minutes' must be a finite number"),
    ("model.dropout=-.inf", "'model.dropout' must be a finite number"),
])
def test_empty_negative_and_non_finite_values_are_refused(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_non_finite_values_inside_list_entries_are_refused():
    with pytest.raises(ConfigError, match=r"'data.mixture.0.weight' must be a finite number"):
        load_config(None, ["data.source=mixture", "data.mixture.0.path=a", "data.mixture.0.weight=.nan"])


@pytest.mark.parametrize("overrides, fragment", [
    (["task.kind=classify"], "task.kind=classify reads labelled examples: data.source must be one of csv, jsonl"),
    (["task.kind=tag", "data.source=csv", "data.path=a.csv"], "must be one of conll, jsonl, tfds, got csv"),
    (["data.source=conll", "data.path=a.conll"], "set task.kind=tag"),
    (["task.kind=tag", "data.source=conll"], "data.source=conll needs data.path"),
    (["data.eval_path=held/*.jsonl"], "data.eval_path names held-out labelled files"),
    (["task.kind=classify", "data.source=jsonl", "data.path=a", "task.pooling=cls"], "not one (use last or mean)"),
    (["task.pooling=max"], "task.pooling"),
])
def test_task_keys_refuse_what_cannot_be_fine_tuned(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_task_pooling_defaults_by_family():
    assert load_config().task.kind == "lm"
    assert load_config(None, ["model.arch=bert"]).pooling == "cls"
    assert load_config(None, ["model.arch=llama"]).pooling == "last"
    tag = load_config(None, ["task.kind=tag", "data.source=conll", "data.path=a.conll", "data.eval_path=b.conll",
                             "task.pooling=mean"])
    assert (tag.pooling, tag.data.eval_path, tag.data.tags_key) == ("mean", "b.conll", "tags")
