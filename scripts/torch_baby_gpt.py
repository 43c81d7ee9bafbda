"""PyTorch reference of the baby GPT (configs/baby_gpt.yaml): the yardstick for the CPU speed target.

The same model as llm_jax builds for that config, written the way a nanoGPT-style PyTorch trainer
writes it: GPT-2 blocks (pre-LayerNorm with bias, learned positions, tanh-approximated GELU as in
llm_jax's `Mlp`, biases on every projection), causal attention through
`F.scaled_dot_product_attention`, tied input/output embeddings, float32, and AdamW with llm_jax's
default hyperparameters (betas 0.9/0.95, eps 1e-8, weight decay 0.1 off biases and norms, global
gradient clipping at 1.0). The query/key/value projections are one fused [d, 3d] matrix, as in
nanoGPT: the same parameter count as llm_jax's three [d, d] projections.

It times the median training step (forward, backward, clipping, AdamW) after a warm-up, on random
tokens, in eager mode and/or under `torch.compile`, and prints one JSON line per mode. It must run
in a PyTorch environment alone, so it does not import llm_jax.

    python scripts/torch_baby_gpt.py --mode eager --steps 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

# configs/baby_gpt.yaml
BABY_GPT = {"n_layers": 6, "d_model": 384, "n_heads": 6, "d_ff": 1536, "vocab_size": 8192, "seq_len": 256,
            "batch_size": 16, "lr": 1e-3}


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(d_model, eps=1e-5)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.LayerNorm(d_model, eps=1e-5)
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)

    def forward(self, x_BLE: torch.Tensor) -> torch.Tensor:
        b, length, d = x_BLE.shape
        q, k, v = self.qkv(self.attn_norm(x_BLE)).split(d, dim=-1)
        # [B, L, E] -> [B, H, L, D]
        q, k, v = (t.view(b, length, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BLE = x_BLE + self.out(h.transpose(1, 2).reshape(b, length, d))
        return x_BLE + self.proj(F.gelu(self.fc(self.mlp_norm(x_BLE)), approximate="tanh"))


class BabyGPT(nn.Module):
    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, vocab_size: int, seq_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model, eps=1e-5)
        # llm_jax's init: normal(0.02), residual-branch outputs scaled by 1/sqrt(2 * n_layers), zero biases.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("out.weight", "proj.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens_BL.shape[1], device=tokens_BL.device)
        x_BLE = self.embed(tokens_BL) + self.pos_embed(positions)
        for block in self.blocks:
            x_BLE = block(x_BLE)
        return F.linear(self.final_norm(x_BLE), self.embed.weight)  # tied output projection


def make_optimizer(model: nn.Module, lr: float, fused: bool,
                   tables: tuple[str, ...] = ("pos_embed",)) -> torch.optim.Optimizer:
    # As llm_jax (optim.decay_mask): kernels and the token embedding decay; biases, norms and the
    # position tables (the 2-D parameters whose names start with one of `tables`) do not.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(tables)]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith(tables)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, vocab_size: int, compile_model: bool):
    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(inputs)
        return F.cross_entropy(logits.view(-1, vocab_size), targets.view(-1))

    # Model and loss in one compiled graph (so the 8192-way softmax fuses too); the backward graph
    # is compiled by AOTAutograd. Clipping and AdamW stay eager, as in nanoGPT.
    forward_loss = torch.compile(loss_fn) if compile_model else loss_fn

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return update(model, optimizer, forward_loss(inputs, targets))

    return step


def update(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    """Backward, global-norm clipping at 1.0 and one optimizer step; returns the detached loss."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def time_steps(step, batch: tuple, steps: int, warmup: int) -> dict:
    """The first step (compiling under torch.compile), `warmup` untimed steps, then the median of
    `steps` timed ones, on the same batch."""
    t0 = time.perf_counter()
    step(*batch)  # compiles under torch.compile; first-call allocations in eager mode
    first_step = time.perf_counter() - t0
    for _ in range(warmup):
        step(*batch)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step(*batch)
        float(loss)  # eager CPU ops are synchronous already; this keeps the timing honest for any backend
        times.append(time.perf_counter() - t0)
    return {"step_time_s": statistics.median(times), "first_step_s": first_step, "loss": float(loss)}


def run(mode: str, steps: int, warmup: int, fused_adamw: bool, seed: int = 0) -> dict:
    cfg = BABY_GPT
    torch.manual_seed(seed)
    model = BabyGPT(cfg["n_layers"], cfg["d_model"], cfg["n_heads"], cfg["d_ff"], cfg["vocab_size"], cfg["seq_len"])
    optimizer = make_optimizer(model, cfg["lr"], fused_adamw)
    step = make_train_step(model, optimizer, cfg["vocab_size"], compile_model=mode == "compile")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, cfg["vocab_size"], (cfg["batch_size"], cfg["seq_len"] + 1), generator=generator)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    timed = time_steps(step, (inputs, targets), steps, warmup)
    return {
        "impl": f"torch-{mode}",
        "tokens_per_sec": cfg["batch_size"] * cfg["seq_len"] / timed["step_time_s"],
        "step_time_s": timed["step_time_s"],
        "first_step_s": timed["first_step_s"],
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fused_adamw": fused_adamw,
        "loss": timed["loss"],
    }


def main(run=run, description: str = __doc__, parser: argparse.ArgumentParser | None = None) -> None:
    """The command line of a PyTorch reference: `run(mode, steps, warmup, fused_adamw)` per mode.

    `parser` may bring a script's own arguments (its model's sizes); they reach `run` as keyword arguments.
    """
    parser = parser or argparse.ArgumentParser(description=description.split("\n\n")[0])
    own = set(vars(parser.parse_known_args([])[0]))
    parser.add_argument("--mode", choices=["eager", "compile", "both"], default="both")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first one")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="intra-op threads (default: the cores this process may use)")
    parser.add_argument("--fused-adamw", action="store_true", help="torch's fused AdamW kernel instead of foreach")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for mode in (["eager", "compile"] if args.mode == "both" else [args.mode]):
        extra = {name: value for name, value in vars(args).items() if name in own}
        print(json.dumps(run(mode, args.steps, args.warmup, args.fused_adamw, **extra)), flush=True)


if __name__ == "__main__":
    main()
