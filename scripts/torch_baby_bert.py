"""PyTorch reference of the baby BERT: the yardstick for the encoder's CPU speed target.

The same network as llm_jax builds for `model.arch=bert` at the baby-GPT size (6 layers, d 384, 6
heads, d_ff 1536, vocab 2048, seq 256, batch 16, float32), written the way a PyTorch user writes
BERT (Hugging Face's BertForMaskedLM, without dropout as llm_jax's default):

- embeddings: word + learned position + token type (2 types, all rows type 0), then LayerNorm;
- post-LayerNorm blocks (x = norm(x + attention(x)), x = norm(x + mlp(x))), LayerNorm eps 1e-12,
  biases on every projection, exact (erf) GELU, bidirectional attention through
  `F.scaled_dot_product_attention(is_causal=False)` (the rows are full-length single documents, as
  `llm-jax bench` makes them, so no mask); the query/key/value projections are one fused [d, 3d]
  matrix, the same parameter count as llm_jax's three [d, d];
- the masked-LM head: dense + GELU + LayerNorm, then the word embedding's transpose (tied) plus a
  bias of its own; logits for every position, the loss (cross entropy) over the masked ones only
  (Hugging Face's ignore_index=-100 labels);
- masking as BERT's: 15% of the positions, of those 80% [MASK], 10% a random token, 10% unchanged;
  one masked batch reused every step (the step costs the same);
- AdamW with llm_jax's defaults (betas 0.9/0.95, eps 1e-8, weight decay 0.1 off biases, norms and
  the position table, global gradient clipping at 1.0), as scripts/torch_baby_gpt.py.

It times the median training step after a warm-up, in eager mode and/or under `torch.compile`, and
prints one JSON line per mode; tokens/s counts every position of the batch (batch * seq per step),
as `llm-jax bench` does. It must run in a PyTorch environment alone, so it does not import llm_jax.

    python scripts/torch_baby_bert.py --mode eager --steps 10
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch_baby_gpt import (  # scripts/ is this script's directory, so on sys.path
    main,
    make_optimizer,
    time_steps,
    update,
)

# `model.arch=bert` with bench_vs_torch.py's overrides (the baby GPT's sizes, llm_jax's default vocab).
BABY_BERT = {"n_layers": 6, "d_model": 384, "n_heads": 6, "d_ff": 1536, "vocab_size": 2048, "seq_len": 256,
             "batch_size": 16, "lr": 1e-3}
TYPE_VOCAB = 2  # token types (segment A / B), as BERT's
NORM_EPS = 1e-12
MASK_RATE = 0.15
MASK_ID = 3  # a special id: the random batch draws its tokens from [4, vocab), as torch_baby_gpt.py
IGNORE = -100  # the label of a position that is not predicted


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.attn_norm = nn.LayerNorm(d_model, eps=NORM_EPS)
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.mlp_norm = nn.LayerNorm(d_model, eps=NORM_EPS)

    def forward(self, x_BLE: torch.Tensor) -> torch.Tensor:
        b, length, d = x_BLE.shape
        q, k, v = self.qkv(x_BLE).split(d, dim=-1)
        # [B, L, E] -> [B, H, L, D]
        q, k, v = (t.view(b, length, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        x_BLE = self.attn_norm(x_BLE + self.out(h.transpose(1, 2).reshape(b, length, d)))
        return self.mlp_norm(x_BLE + self.proj(F.gelu(self.fc(x_BLE))))  # exact GELU


class BabyBert(nn.Module):
    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, vocab_size: int, seq_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(seq_len, d_model)  # the name make_optimizer keeps from weight decay
        self.type_embed = nn.Embedding(TYPE_VOCAB, d_model)
        self.embed_norm = nn.LayerNorm(d_model, eps=NORM_EPS)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.head_dense = nn.Linear(d_model, d_model)
        self.head_norm = nn.LayerNorm(d_model, eps=NORM_EPS)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        # BERT's pooler, as llm_jax's encoder has it: in the model, unused by the masked-LM loss.
        self.pooler = nn.Linear(d_model, d_model)
        # As torch_baby_gpt.py: normal(0.02), residual-branch outputs scaled by 1/sqrt(2 * n_layers), zero biases.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("out.weight", "proj.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens_BL: torch.Tensor, types_BL: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens_BL.shape[1], device=tokens_BL.device)
        x_BLE = self.embed_norm(self.embed(tokens_BL) + self.pos_embed(positions) + self.type_embed(types_BL))
        for block in self.blocks:
            x_BLE = block(x_BLE)
        h_BLE = self.head_norm(F.gelu(self.head_dense(x_BLE)))
        return F.linear(h_BLE, self.embed.weight, self.head_bias)  # tied output projection, own bias


def mask_tokens(tokens_BL: torch.Tensor, vocab_size: int, generator: torch.Generator):
    """BERT's masking: (inputs, labels) with labels IGNORE wherever the position is not predicted."""
    chosen = torch.rand(tokens_BL.shape, generator=generator) < MASK_RATE
    labels = torch.where(chosen, tokens_BL, IGNORE)
    draw = torch.rand(tokens_BL.shape, generator=generator)
    random_tokens = torch.randint(4, vocab_size, tokens_BL.shape, generator=generator)
    inputs = torch.where(chosen & (draw < 0.8), MASK_ID, tokens_BL)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_tokens, inputs)
    return inputs, labels


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, vocab_size: int, compile_model: bool):
    def loss_fn(inputs: torch.Tensor, types: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(inputs, types)
        return F.cross_entropy(logits.view(-1, vocab_size), labels.view(-1), ignore_index=IGNORE)

    # Model and loss in one compiled graph; clipping and AdamW stay eager, as in torch_baby_gpt.py.
    forward_loss = torch.compile(loss_fn) if compile_model else loss_fn

    def step(inputs: torch.Tensor, types: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return update(model, optimizer, forward_loss(inputs, types, labels))

    return step


def run(mode: str, steps: int, warmup: int, fused_adamw: bool, seed: int = 0) -> dict:
    cfg = BABY_BERT
    torch.manual_seed(seed)
    model = BabyBert(cfg["n_layers"], cfg["d_model"], cfg["n_heads"], cfg["d_ff"], cfg["vocab_size"], cfg["seq_len"])
    optimizer = make_optimizer(model, cfg["lr"], fused_adamw)
    step = make_train_step(model, optimizer, cfg["vocab_size"], compile_model=mode == "compile")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, cfg["vocab_size"], (cfg["batch_size"], cfg["seq_len"]), generator=generator)
    inputs, labels = mask_tokens(tokens, cfg["vocab_size"], generator)
    types = torch.zeros_like(inputs)

    timed = time_steps(step, (inputs, types, labels), steps, warmup)
    return {
        "impl": f"torch-{mode}",
        "model": "baby-bert",
        # every position, as llm-jax bench
        "tokens_per_sec": cfg["batch_size"] * cfg["seq_len"] / timed["step_time_s"],
        "step_time_s": timed["step_time_s"],
        "first_step_s": timed["first_step_s"],
        "params": sum(p.numel() for p in model.parameters()),
        "masked_fraction": float((labels != IGNORE).float().mean()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fused_adamw": fused_adamw,
        "loss": timed["loss"],
    }


if __name__ == "__main__":
    main(run, __doc__)
