"""Checks of a whole Config: what no single key's type can say (combinations, sizes, devices)."""

from __future__ import annotations

from llm_jax.config.schema import CHOICES, Config, ConfigError

MLM_SYMBOLS = ("[CLS]", "[SEP]", "[MASK]")


def sentinel_symbols(extra_ids: int) -> tuple[str, ...]:
    """T5's sentinels, in id order: <extra_id_0>, <extra_id_1>, ..."""
    return tuple(f"<extra_id_{i}>" for i in range(extra_ids))


def reserved_symbols(c: Config) -> tuple[str, ...]:
    """The symbols a run's tokenizer must hold for its objective, in the order they get ids (after
    pad, unk, bos, eos): mlm [CLS] [SEP] [MASK]; span and seq2seq the sentinels."""
    if c.objective == "mlm":
        return MLM_SYMBOLS
    if c.objective in ("span", "seq2seq"):
        return sentinel_symbols(c.tokenizer.extra_ids)
    return ()


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
    _require(m.max_documents_per_row is None or m.max_documents_per_row > 0,
             f"config key 'model.max_documents_per_row' must be positive, got {m.max_documents_per_row}")
    _require(m.head_dim is None or m.head_dim > 0, f"config key 'model.head_dim' must be positive, got {m.head_dim}")
    _require(m.head_dim is not None or m.d_model % m.n_heads == 0,
             f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}), or set model.head_dim")
    _require(m.kv_heads > 0 and m.n_heads % m.kv_heads == 0,
             f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.kv_heads})")
    _require(m.resolved_position != "rope" or m.resolved_head_dim % 2 == 0,
             f"RoPE needs an even head dimension; the head dimension is {m.resolved_head_dim}")
    for key in ("dtype", "param_dtype"):
        # float16 without loss scaling (which this trainer does not do) loses small gradients to
        # underflow without any error; bfloat16 has float32's range and the same memory.
        _require(getattr(m, key) != "float16",
                 f"model.{key}=float16 needs loss scaling, which llm_jax does not do (small gradients would "
                 f"silently underflow to zero); use model.{key}=bfloat16")
    _require(c.objective in m.family.objectives,
             f"train.objective={c.objective} cannot train model.arch={m.arch}, which learns "
             f"{' or '.join(m.family.objectives)} (leave train.objective unset for the family's)")
    _require((m.resolved_position == "relative") == m.family.encoder_decoder,
             f"model.position={m.resolved_position} does not fit model.arch={m.arch}: relative position biases "
             "are the encoder-decoder's (t5) and its only positions")
    # The fused kernels (cpu_kernels, cuDNN, splash) take a mask but no additive bias: relative positions are
    # always attended explicitly (models/relative.py), so another choice would be ignored without a word.
    _require(m.attention == "xla" or m.resolved_position != "relative",
             f"model.attention={m.attention} does not fit model.arch={m.arch}: its relative position biases are "
             "added to the scores, which the fused kernels cannot take; use model.attention=xla")
    for key in ("n_encoder_layers", "n_decoder_layers"):
        value = getattr(m, key)
        _require(value is None or value > 0, f"config key 'model.{key}' must be positive, got {value}")
    for key in ("relative_buckets", "relative_max_distance"):
        _require(getattr(m, key) > 0, f"config key 'model.{key}' must be positive, got {getattr(m, key)}")
    _require(0.0 <= m.dropout < 1.0, f"config key 'model.dropout' must be in [0, 1), got {m.dropout}")
    tk = c.tokenizer
    # pad, unk, bos, eos, for mlm [CLS] [SEP] [MASK] (data/tokenizer.py, MLM_SYMBOLS), then the user's
    # symbols (one listed twice is one piece), then 256 byte pieces with byte fallback.
    _require(tk.extra_ids >= 0, f"config key 'tokenizer.extra_ids' must be >= 0, got {tk.extra_ids}")
    _require(c.objective != "span" or tk.extra_ids > 0,
             "train.objective=span needs sentinels: tokenizer.extra_ids must be positive")
    reserved = reserved_symbols(c)
    symbols = len(dict.fromkeys((*reserved, *tk.user_defined_symbols)))
    needed = 4 + symbols + (256 if tk.byte_fallback else 0)
    what = {"mlm": " (with [CLS], [SEP], [MASK] for mlm)",
            "span": f" (with {tk.extra_ids} sentinels <extra_id_N>)",
            "seq2seq": f" (with {tk.extra_ids} sentinels <extra_id_N>)"}.get(c.objective, "") if reserved else ""
    _require(m.vocab_size >= needed or bool(tk.path),
             f"model.vocab_size ({m.vocab_size}) must be at least {needed} to train a tokenizer with "
             f"{symbols} user-defined symbols" + what + (" and byte fallback" if tk.byte_fallback else ""))
    _require(all(tk.user_defined_symbols) and len(set(tk.user_defined_symbols)) == len(tk.user_defined_symbols),
             "config key 'tokenizer.user_defined_symbols' must list distinct, non-empty strings")

    t = c.train
    for key in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches"):
        _require(getattr(t, key) > 0, f"config key 'train.{key}' must be positive, got {getattr(t, key)}")
    _require(t.target_len >= 0, f"config key 'train.target_len' must be >= 0 (0: derived), got {t.target_len}")
    _require(t.target_len == 0 or m.family.encoder_decoder,
             f"train.target_len is an encoder-decoder's decoder length; model.arch={m.arch} has one length, "
             "train.seq_len")
    _require(c.objective != "span" or t.seq_len >= 4,
             f"train.seq_len ({t.seq_len}) must be at least 4 for span corruption")
    # A sentinel, a dropped token and eos: shorter targets leave pieces of one token, which have no noise,
    # and the run would learn nothing but eos.
    _require(c.objective != "span" or t.target_len == 0 or t.target_len >= 3,
             f"train.target_len ({t.target_len}) must be at least 3 for span corruption (a sentinel, a dropped "
             "token and eos), or 0 to derive it from train.seq_len")
    if c.objective == "span" and tk.extra_ids > 0:
        from llm_jax.data.objectives import noise_counts, span_piece_length  # imports nothing of llm_jax

        spans = noise_counts(span_piece_length(t.seq_len, c.target_len))[1]
        _require(spans <= tk.extra_ids,
                 f"tokenizer.extra_ids ({tk.extra_ids}) is fewer than the {spans} noise spans of a piece that fills "
                 f"train.seq_len={t.seq_len}: each span needs its own sentinel; raise tokenizer.extra_ids")
    _require(c.objective != "mlm" or t.seq_len >= 3,
             f"train.seq_len ({t.seq_len}) must be at least 3 for masked LM: [CLS], a token and [SEP]")
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
    _require(d.source not in ("text", "jsonl", "csv", "conll") or bool(d.path),
             f"data.source={d.source} needs data.path (a glob of files)")
    kind = c.task.kind
    labelled_sources = {"classify": ("csv", "jsonl", "tfds"), "tag": ("conll", "jsonl", "tfds")}
    _require(kind == "lm" or d.source in labelled_sources[kind],
             f"task.kind={kind} reads labelled examples: data.source must be one of "
             f"{', '.join(labelled_sources.get(kind, ()))}, got {d.source}")
    _require(kind != "lm" or d.source not in ("csv", "conll"),
             f"data.source={d.source} holds labelled examples: set task.kind="
             f"{'classify' if d.source == 'csv' else 'tag'}")
    _require(kind != "lm" or not d.eval_path,
             "data.eval_path names held-out labelled files (task.kind=classify or tag); pretraining holds out "
             "data.eval_fraction of its documents")
    # A decoder's first token attends to itself alone: pooling there would classify from nothing.
    _require(c.pooling != "cls" or m.family.encoder,
             f"task.pooling=cls reads the [CLS] position of an encoder; model.arch={m.arch} is not one "
             "(use last or mean)")
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

    _check_finetune(c)

    dist = c.distributed
    _require(dist.num_processes is None or dist.num_processes > 0,
             f"config key 'distributed.num_processes' must be positive, got {dist.num_processes}")
    if dist.process_id is not None and dist.num_processes is not None:
        _require(0 <= dist.process_id < dist.num_processes,
                 f"distributed.process_id ({dist.process_id}) must be in [0, {dist.num_processes})")


# The eval metrics of each kind of run (train/loop.evaluate and the task metrics): what early stopping can watch.
_EVAL_METRICS = {"lm": ("eval_loss", "eval_perplexity"),
                 "classify": ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_macro_f1"),
                 "tag": ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_precision", "eval_recall", "eval_f1")}


def eval_metrics(c: Config) -> tuple[str, ...]:
    """The metrics each eval line of this run holds (masked LM also scores its accuracy)."""
    metrics = _EVAL_METRICS[c.task.kind]
    return (*metrics, "eval_accuracy") if c.task.kind == "lm" and c.objective == "mlm" else metrics


def freeze_layers(freeze: str) -> int | None:
    """N of `finetune.freeze=layers:N`, or None for the other modes (a malformed N: ConfigError)."""
    if not freeze.startswith("layers:"):
        return None
    n = freeze.split(":", 1)[1]
    _require(n.isdigit() and int(n) > 0, f"config key 'finetune.freeze' must be layers:N with N a positive integer, "
             f"got {freeze!r}")
    return int(n)


def _check_finetune(c: Config) -> None:
    """Early stopping, what is trained (finetune.*) and distillation."""
    es = c.train.early_stopping
    allowed = eval_metrics(c)
    _require(not es.metric or es.metric in allowed,
             f"config key 'train.early_stopping.metric' must be one of {', '.join(allowed)} for task.kind="
             f"{c.task.kind}, got {es.metric!r}")
    _require(es.mode in ("min", "max", None),
             f"config key 'train.early_stopping.mode' must be one of min, max, null, got {es.mode!r}")
    _require(es.patience > 0, f"config key 'train.early_stopping.patience' must be positive, got {es.patience}")
    _require(es.min_delta >= 0, f"config key 'train.early_stopping.min_delta' must be >= 0, got {es.min_delta}")

    f, m = c.finetune, c.model
    _require(f.freeze in ("none", "embeddings", "body") or f.freeze.startswith("layers:"),
             f"config key 'finetune.freeze' must be one of none, embeddings, body, layers:N, got {f.freeze!r}")
    n = freeze_layers(f.freeze)
    stack = m.encoder_layers if m.family.encoder_decoder else m.n_layers
    _require(n is None or n <= stack, f"finetune.freeze={f.freeze} freezes more blocks than the model's {stack}")
    _require(n is None or not m.scan_layers,
             f"finetune.freeze={f.freeze} freezes some blocks of a layer stack that model.scan_layers=true holds in "
             "one array per weight: set model.scan_layers=false")
    _require(f.freeze != "body" or c.task.kind != "lm",
             "finetune.freeze=body trains the task head alone; task.kind=lm has no task head")
    _require(f.head_lr >= 0, f"config key 'finetune.head_lr' must be >= 0 (0: optimizer.lr), got {f.head_lr}")
    _require(f.head_lr == 0 or c.task.kind != "lm",
             "finetune.head_lr is the task head's; task.kind=lm has no task head")
    _require(bool(f.head_name), "config key 'finetune.head_name' must name the task head's parameters")
    _require(0 < f.layer_decay <= 1, f"config key 'finetune.layer_decay' must be in (0, 1], got {f.layer_decay}")

    d = c.distill
    _require(d.temperature > 0, f"config key 'distill.temperature' must be positive, got {d.temperature}")
    _require(0 <= d.alpha <= 1, f"config key 'distill.alpha' must be in [0, 1], got {d.alpha}")
    _require(not d.teacher or c.parallel.mode == "jit",
             "distill.teacher needs parallel.mode=jit (the teacher is sharded like the student over the mesh)")


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
