"""PyTorch reference of the baby T5 (configs/t5_tiny.yaml): the yardstick for the encoder-decoder's speed.

The reference is Hugging Face's `transformers.T5ForConditionalGeneration`, not a model written here:
it is the PyTorch T5 that people pretrain and fine-tune, so it is the fair yardstick (a hand-written
copy would measure how well we write PyTorch). It is built from a `T5Config` with the sizes of the
llm_jax config, as llm_jax's t5 family builds them (T5 v1.1 by default):

- pre-norm RMSNorm blocks (eps 1e-6), no biases, no 1/sqrt(head_dim) scaling of the attention
  scores; bucketed relative position biases (`model.relative_buckets` buckets, exact up to half of
  them, logarithmic up to `model.relative_max_distance`), one table per stack, in its first block;
- the MLP as `model.activation` / `model.gated_mlp` say: v1.1's gated GELU (tanh), HF's
  feed_forward_proj "gated-gelu" (`gelu_new`); the original T5 is relu, not gated;
- one token embedding shared by both stacks; the output projection untied (v1.1) or the
  embedding itself with the decoder output scaled by d_model ** -0.5 (`model.tie_embeddings=true`,
  the original T5). Transformers 5 ties the output projection always; `make_hf_t5` unties it;
- no dropout (llm_jax's default), float32, HF's own initialisation (it does not change the cost).

The batch is what `llm-jax bench` feeds an encoder-decoder: random full-length rows, encoder inputs
[batch, seq_len] and targets [batch, target_len], the decoder inputs being the targets shifted right
behind T5's start id 0 (pad), no padding, so no attention masks. target_len is `train.target_len`, or
derived as llm_jax derives it: span corruption's targets of a piece whose inputs fill seq_len
(llm_jax/data/objectives.span_lengths: 512 -> 114), seq2seq's seq_len. The loss is the cross
entropy over every target position. AdamW as scripts/torch_baby_gpt.py (llm_jax's defaults: betas
0.9/0.95, eps 1e-8, weight decay 0.1 on the 2-D weights but the relative bias tables, which llm_jax
keeps from decay as it does position tables, and not on the norms; global clipping at 1.0;
`optimizer.lr`).

It times the median training step after a warm-up, in eager mode and/or under `torch.compile`, and
prints one JSON line per mode; tokens/s counts seq_len + target_len tokens per row, as `llm-jax
bench` does for an encoder-decoder. The sizes come from `--config` (default configs/t5_tiny.yaml
when present, else llm_jax's defaults for `model.arch=t5`) and `key=value` overrides with llm_jax's
names; keys that do not shape this model (model.attention, ...) are reported and left out. It runs
in a PyTorch environment (torch, transformers, pyyaml, numpy) without llm_jax installed: the only
llm_jax code it reads is the length rule of data/objectives.py, which imports numpy alone.

    python scripts/torch_baby_t5.py --mode eager --steps 10
    python scripts/torch_baby_t5.py --config configs/t5_tiny.yaml model.n_layers=2 --mode both
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
import yaml
from torch import nn
from torch_baby_gpt import (  # scripts/ is this script's directory, so on sys.path
    main,
    make_optimizer,
    time_steps,
    update,
)
from transformers import T5Config, T5ForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "t5_tiny.yaml"
# The relative position bias tables, kept from weight decay as llm_jax's decay mask keeps them.
RELATIVE_TABLES = ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
                   "decoder.block.0.layer.0.SelfAttention.relative_attention_bias")

# llm_jax's defaults (config/schema.py) for model.arch=t5, the t5 family's choices (models/families.py)
# filled in: what the run builds when the config does not say otherwise.
DEFAULTS = {
    "model.vocab_size": 2048, "model.n_layers": 4, "model.n_encoder_layers": None, "model.n_decoder_layers": None,
    "model.d_model": 256, "model.n_heads": 4, "model.d_ff": 1024, "model.activation": "gelu_tanh",
    "model.gated_mlp": True, "model.tie_embeddings": False, "model.relative_buckets": 32,
    "model.relative_max_distance": 128, "model.norm_eps": 1e-6,
    "train.batch_size": 16, "train.seq_len": 128, "train.target_len": 0, "train.objective": "span",
    "optimizer.lr": 2e-3,
}
# Keys of an llm_jax config that this reference ignores without changing what a step computes (the
# schedule changes the learning rate's value only); a YAML's keys outside model. and optimizer.
# (workdir, steps, data, ...) do not shape one training step either.
NOT_SHAPING = ("model.arch", "model.max_len", "model.dropout", "optimizer.warmup_steps", "optimizer.min_lr_ratio",
               "optimizer.decay_steps")
# llm_jax's MLP activations by their Hugging Face (ACT2FN) names; T5 v1.1's GELU is tanh's `gelu_new`.
HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def target_length(seq_len: int, target_len: int, objective: str) -> int:
    """An encoder-decoder's decoder length as llm_jax's `Config.target_len` derives it."""
    if target_len:
        return target_len
    if objective == "seq2seq":
        return seq_len
    sys.path.insert(0, str(ROOT))  # numpy-only module; llm_jax need not be installed
    from llm_jax.data.objectives import span_lengths

    return span_lengths(seq_len)[1]


def load_sizes(config: str | None, overrides: list[str]) -> dict:
    """The llm_jax keys this reference needs, from the YAML (or the preset when it exists), then the
    `key=value` overrides (values as YAML scalars, as llm_jax parses them), over DEFAULTS."""
    path = Path(config) if config else (PRESET if PRESET.exists() else None)
    given = _flatten(yaml.safe_load(path.read_text()) or {}) if path else {}
    for text in overrides:
        key, _, raw = text.partition("=")
        given[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    if given.get("model.arch", "t5") != "t5":
        sys.exit(f"the T5 reference needs model.arch=t5, got {given['model.arch']}")
    sizes = dict(DEFAULTS)
    for key, value in given.items():
        if key in DEFAULTS:
            if value is not None or key in ("model.n_encoder_layers", "model.n_decoder_layers"):
                sizes[key] = value  # None elsewhere means "the family's": DEFAULTS already has it
        elif key in ("model.dtype", "model.param_dtype") and value == "float32":
            pass  # the reference's precision
        elif key.startswith(("model.", "optimizer.")) and key not in NOT_SHAPING:
            print(f"torch_baby_t5: {key}={value} is not applied to the PyTorch reference", file=sys.stderr)
    sizes["path"] = str(path) if path else None
    sizes["target_len"] = target_length(sizes["train.seq_len"], sizes["train.target_len"], sizes["train.objective"])
    return sizes


def hf_config(sizes: dict) -> T5Config:
    """The `T5Config` of the llm_jax sizes (the keys of DEFAULTS)."""
    n_layers = sizes["model.n_layers"]
    activation = HF_ACTIVATIONS[sizes["model.activation"]]
    config = T5Config(
        vocab_size=sizes["model.vocab_size"], d_model=sizes["model.d_model"],
        d_kv=sizes["model.d_model"] // sizes["model.n_heads"], d_ff=sizes["model.d_ff"],
        num_layers=sizes["model.n_encoder_layers"] or n_layers,
        num_decoder_layers=sizes["model.n_decoder_layers"] or n_layers, num_heads=sizes["model.n_heads"],
        relative_attention_num_buckets=sizes["model.relative_buckets"],
        relative_attention_max_distance=sizes["model.relative_max_distance"],
        dropout_rate=0.0, layer_norm_epsilon=sizes["model.norm_eps"],
        feed_forward_proj=("gated-" if sizes["model.gated_mlp"] else "") + activation,
        tie_word_embeddings=sizes["model.tie_embeddings"], use_cache=False,
        pad_token_id=0, decoder_start_token_id=0, eos_token_id=3,  # llm_jax's ids: pad 0 (T5's start), eos 3
    )
    config.dense_act_fn = activation  # T5Config turns "gated-gelu" into gelu_new; exact GELU stays exact
    return config


def make_hf_t5(config: T5Config) -> T5ForConditionalGeneration:
    """`T5ForConditionalGeneration(config)` whose output projection is tied exactly when the config
    asked for it: transformers 5 ties it to the embedding always (and keeps `tie_word_embeddings=False`
    only as the switch of the d_model ** -0.5 output scaling), which would make v1.1 another model."""
    tied = getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)
    model = T5ForConditionalGeneration(config)
    if not tied and model.lm_head.weight is model.shared.weight:
        model.lm_head.weight = nn.Parameter(model.shared.weight.detach().clone())
    assert (model.lm_head.weight is model.shared.weight) == tied, "output projection tying"
    assert model.encoder.embed_tokens.weight is model.shared.weight is model.decoder.embed_tokens.weight
    return model


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, vocab_size: int, compile_model: bool):
    def loss_fn(encoder_inputs: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=encoder_inputs, decoder_input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.view(-1, vocab_size), targets.view(-1))

    # Model and loss in one compiled graph; clipping and AdamW stay eager, as in torch_baby_gpt.py.
    forward_loss = torch.compile(loss_fn) if compile_model else loss_fn

    def step(encoder_inputs: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return update(model, optimizer, forward_loss(encoder_inputs, inputs, targets))

    return step


def random_batch(batch_size: int, seq_len: int, target_len: int, vocab_size: int, generator: torch.Generator):
    """(encoder inputs, decoder inputs, targets): ids from [4, vocab), as torch_baby_gpt.py; the decoder
    inputs are the targets shifted right behind the start id 0, llm_jax's batch layout."""
    encoder_inputs = torch.randint(4, vocab_size, (batch_size, seq_len), generator=generator)
    targets = torch.randint(4, vocab_size, (batch_size, target_len), generator=generator)
    inputs = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], dim=1)
    return encoder_inputs, inputs, targets


def run(mode: str, steps: int, warmup: int, fused_adamw: bool, config: str | None = None,
        overrides: list[str] | None = None, seed: int = 0) -> dict:
    sizes = load_sizes(config, overrides or [])
    torch.manual_seed(seed)
    model = make_hf_t5(hf_config(sizes))
    model.train()  # dropout is 0: train mode changes nothing but says what is timed
    vocab_size, batch_size = sizes["model.vocab_size"], sizes["train.batch_size"]
    seq_len, target_len = sizes["train.seq_len"], sizes["target_len"]
    optimizer = make_optimizer(model, sizes["optimizer.lr"], fused_adamw, tables=RELATIVE_TABLES)
    step = make_train_step(model, optimizer, vocab_size, compile_model=mode == "compile")
    batch = random_batch(batch_size, seq_len, target_len, vocab_size, torch.Generator().manual_seed(seed))

    timed = time_steps(step, batch, steps, warmup)
    return {
        "impl": f"torch-{mode}",
        "model": "baby-t5",
        "config": sizes["path"],
        # both sides of every row, as llm-jax bench counts an encoder-decoder
        "tokens_per_sec": batch_size * (seq_len + target_len) / timed["step_time_s"],
        "step_time_s": timed["step_time_s"],
        "first_step_s": timed["first_step_s"],
        "params": sum(p.numel() for p in model.parameters()),
        "seq_len": seq_len,
        "target_len": target_len,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fused_adamw": fused_adamw,
        "loss": timed["loss"],
    }


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help=f"an llm_jax YAML (default: {PRESET.relative_to(ROOT)} "
                        "when present, else llm_jax's defaults for model.arch=t5)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="llm_jax overrides of the sizes")
    return parser


if __name__ == "__main__":
    main(run, __doc__, arguments())
