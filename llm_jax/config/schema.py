"""The config's keys: one frozen dataclass per concern, with defaults, and the allowed choices.

The built-in defaults are the main job (a small decoder LM on the embedded default corpus).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llm_jax.models.families import FAMILIES, OBJECTIVES, Family


class ConfigError(ValueError):
    """A config the run cannot use. The message is one line naming the key."""


# model.attention=cudnn's default bound on the documents of a row (ModelConfig.max_documents_per_row).
CUDNN_DOCUMENTS_PER_ROW = 16


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the model sees; nothing else reaches the Linen modules."""

    arch: str = "gpt2"  # a family of models/families.py: gpt2 | llama | bert | t5
    vocab_size: int = 2048
    n_layers: int = 4
    n_encoder_layers: int | None = None  # an encoder-decoder's encoder stack (t5); None: n_layers
    n_decoder_layers: int | None = None  # an encoder-decoder's decoder stack (t5); None: n_layers
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (multi-head); fewer: grouped-query attention
    # Width of one attention head; None: d_model // n_heads. Set it where heads x head_dim differs from
    # d_model, as in Hugging Face checkpoints such as t5-v1_1-small (6 x 64 against 512) or Gemma.
    head_dim: int | None = None
    d_ff: int = 1024
    max_len: int = 1024  # longest sequence the learned position table supports
    # learned | sinusoidal | rope | relative (t5's bucketed biases); None: the family's (gpt2 learned, llama rope)
    position: str | None = None
    tie_embeddings: bool | None = None  # None: the family's (gpt2 tied, llama untied)
    activation: str | None = None  # of the MLP: gelu_tanh | gelu | silu | relu; None: the family's
    gated_mlp: bool | None = None  # activation(gate) * up (GLU) instead of activation(fc); None: the family's
    # Relative positions (t5): distances fall into this many buckets (rows of each stack's bias table; the
    # encoder splits them between the two directions), exact for short distances, then logarithmic up to
    # relative_max_distance, beyond which they share the last bucket.
    relative_buckets: int = 32
    relative_max_distance: int = 128
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    norm_eps: float | None = None  # None: the family's (1e-5; bert 1e-12)
    rope_theta: float = 10000.0
    init_std: float = 0.02
    scan_layers: bool = False  # one compiled layer body, looped with nn.scan
    remat: str = "none"  # none | full | dots: what the backward pass recomputes
    # xla (explicit; fused C++ kernel on one CPU device) | cudnn (jax.nn.dot_product_attention) | splash (Pallas, TPU)
    attention: str = "xla"
    # The most documents the packer puts in one row. None: no limit, except with attention=cudnn: 16. cuDNN's
    # packed attention is compiled for a fixed number of sequences per row, and its backward pass takes
    # temporary memory in proportion to it (measured on an H100-class GPU, 8 x 2048 rows, 16 x 128 heads:
    # 4.4 GiB for 32 sequences, 260 GiB for one per position), so the packer and the kernel share this bound.
    max_documents_per_row: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def resolved_max_documents_per_row(self) -> int | None:
        if self.max_documents_per_row is None and self.attention == "cudnn":
            return CUDNN_DOCUMENTS_PER_ROW
        return self.max_documents_per_row

    @property
    def family(self) -> Family:
        return FAMILIES[self.arch]

    @property
    def resolved_position(self) -> str:
        return self.family.position if self.position is None else self.position

    @property
    def resolved_tie_embeddings(self) -> bool:
        return self.family.tie_embeddings if self.tie_embeddings is None else self.tie_embeddings

    @property
    def resolved_norm_eps(self) -> float:
        return self.family.norm_eps if self.norm_eps is None else self.norm_eps

    @property
    def resolved_activation(self) -> str:
        return self.family.activation if self.activation is None else self.activation

    @property
    def resolved_gated_mlp(self) -> bool:
        return self.family.gated_mlp if self.gated_mlp is None else self.gated_mlp

    @property
    def mlp_matrices(self) -> int:
        """The d_model x d_ff weight matrices of one MLP (gate, up and down when gated), for FLOPs."""
        return 3 if self.resolved_gated_mlp else 2

    @property
    def encoder_layers(self) -> int:
        return self.n_layers if self.n_encoder_layers is None else self.n_encoder_layers

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    # An existing tokenizer: a SentencePiece .model, a Hugging Face tokenizer.json, or a folder holding either
    # (data/tokenizer.py, copy_tokenizer); empty: train one on the corpus.
    path: str = ""
    model_type: str = "bpe"  # bpe | unigram
    sample_bytes: int = 4_000_000  # training input is a sample of the corpus of about this size
    byte_fallback: bool = True  # characters outside the vocabulary become byte pieces, never <unk>
    # Pieces that are always one token and never split (e.g. ["<|user|>", "<|end|>"]); their ids follow
    # pad/unk/bos/eos (and, for masked LM, [CLS] [SEP] [MASK]: ids 4-6) in the order given.
    user_defined_symbols: tuple[str, ...] = ()
    # Sentinels <extra_id_0> ... <extra_id_{N-1}> that span corruption puts in place of the dropped spans
    # (reserved by the tokenizer of a span or seq2seq run, after [pad, unk, bos, eos], before the user's).
    extra_ids: int = 100


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
    # default | text | jsonl | tfds | mixture; labelled examples (task.kind classify, tag) also csv | conll
    source: str = "default"
    path: str = ""  # a glob of local files (text, jsonl, csv, conll)
    # Held-out labelled files (a glob, in data.source's format); empty: a stable-hash share
    # (data.eval_fraction) of data.path's examples.
    eval_path: str = ""
    text_key: str = "text"  # the JSON field (jsonl), CSV column (csv) or TFDS feature holding the text
    # classify: the field/column/feature of an example's second text (sentence pairs); empty: single texts.
    text_pair_key: str = ""
    label_key: str = "label"  # classify: the field/column/feature holding an example's label
    tokens_key: str = "tokens"  # tag: the JSON field / TFDS feature holding a sentence's words
    tags_key: str = "tags"  # tag: the JSON field / TFDS feature holding their tags (conll2003: ner)
    # seq2seq: the JSON fields (jsonl) or TFDS features holding an example's input and its target.
    input_key: str = "input"
    target_key: str = "target"
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
class EarlyStoppingConfig:
    """Stop when a held-out metric has stopped improving (train/early_stopping.py); checked at each eval."""

    metric: str = ""  # an eval metric, e.g. eval_loss, eval_accuracy, eval_f1; empty: never stop early
    mode: str | None = None  # min | max; None: min for eval_loss and eval_perplexity, max for the others
    patience: int = 3  # evaluations in a row without improvement before the run stops
    min_delta: float = 0.0  # an improvement is a change of more than this in the better direction


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    # clm (next-token prediction, decoders) | mlm (masked tokens, encoders) | span (T5's span corruption) |
    # seq2seq (input -> target pairs; encoder-decoders); None: the family's
    objective: str | None = None
    batch_size: int = 16  # global, in sequences
    seq_len: int = 128  # an encoder-decoder: the encoder's (input) length
    # An encoder-decoder's decoder (target) length; 0: derived, for span from seq_len so that corrupted
    # pieces fill both sides (data/objectives.span_lengths), for seq2seq equal to seq_len.
    target_len: int = 0
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
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    keep: int = 3  # the newest checkpoints kept
    async_save: bool = True
    every_minutes: float = 0.0  # also save when this much time has passed since the last save; 0: off
    # Also keep the best checkpoint: of the lowest eval loss, or of train.early_stopping.metric when set
    # (every eval step is saved). Early stopping keeps it whatever this says.
    keep_best: bool = False
    # A run refuses to start over at step 0 when every checkpoint was set aside in damaged_checkpoints/:
    # training would be lost without a word. true: start anyway.
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
class TaskConfig:
    """What the run learns from: language modelling (pretraining) or labelled examples (fine-tuning)."""

    kind: str = "lm"  # lm | classify (one label per example or pair) | tag (one label per word)
    # classify: which positions the head reads: cls (the first, [CLS]) | last (the last real token) |
    # mean (all real tokens); None: the family's (encoders cls, decoders last).
    pooling: str | None = None


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """What is trained, and how fast (train/optim.py)."""

    # none | embeddings | body (all but the task head) | layers:N (the embeddings and the first N blocks).
    # Frozen parameters get no update and no optimizer state.
    freeze: str = "none"
    head_lr: float = 0.0  # the task head's peak learning rate; 0: optimizer.lr
    head_name: str = "head"  # the top-level parameter name of the task head (models/heads.py)
    # Layer-wise learning-rate decay: block i (from 0) of n gets lr * layer_decay**(n - i), the
    # embeddings layer_decay**(n + 1), everything above the blocks lr. 1: off.
    layer_decay: float = 1.0


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from a trained teacher (train/distill.py)."""

    teacher: str = ""  # a run directory or an `llm-jax export` directory; empty: no distillation
    # Both distributions are softened by it; the KL term is scaled by its square. 1: measured best on a
    # small language model (docs/benchmarks.md, distillation), where 2 did worse than no teacher.
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs the task loss


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/default"
    seed: int = 0
    init_from: str = ""  # an `llm-jax export` directory: start from its parameters (fresh optimizer, step 0)
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    distill: DistillConfig = DistillConfig()
    mesh: MeshConfig = MeshConfig()
    parallel: ParallelConfig = ParallelConfig()
    distributed: DistributedConfig = DistributedConfig()

    @property
    def objective(self) -> str:
        """What the run learns: train.objective, or the pretraining task of the model's family."""
        return self.train.objective or self.model.family.objective

    @property
    def target_len(self) -> int:
        """An encoder-decoder's decoder (target) length: train.target_len, or derived from seq_len: for
        span corruption the targets of a piece whose inputs fill seq_len (data/objectives.span_lengths),
        for seq2seq seq_len. Other families: seq_len (one length)."""
        if self.train.target_len:
            return self.train.target_len
        if self.objective == "span":
            # The length rule belongs to span corruption; that module imports nothing of llm_jax.
            from llm_jax.data.objectives import span_lengths

            return span_lengths(self.train.seq_len)[1]
        return self.train.seq_len

    @property
    def pooling(self) -> str:
        """How a classification head pools: task.pooling, or the family's (encoders cls, decoders last)."""
        if self.task.pooling is not None:
            return self.task.pooling
        return "cls" if self.model.family.encoder else "last"


CHOICES = {
    "model.arch": tuple(FAMILIES),
    "model.position": ("learned", "sinusoidal", "rope", "relative", None),
    "model.activation": ("gelu_tanh", "gelu", "silu", "relu", None),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots"),
    "model.attention": ("xla", "cudnn", "splash"),
    "train.objective": (*OBJECTIVES, None),
    "tokenizer.model_type": ("bpe", "unigram"),
    "task.kind": ("lm", "classify", "tag"),
    "task.pooling": ("cls", "last", "mean", None),
    "data.source": ("default", "text", "jsonl", "csv", "conll", "tfds", "mixture"),
    "data.text_unit": ("file", "line"),
    "optimizer.name": ("adamw", "lamb"),
    "parallel.mode": ("jit", "pmap"),
}
