"""The optax transformation: AdamW or LAMB, warmup + cosine schedule, clipping, decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

from llm_jax.config import OptimizerConfig

# Parameters named like this are norm scales and biases: decaying them only hurts.
NO_DECAY_NAMES = ("bias", "scale")


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at the schedule's end.

    The end is `optimizer.decay_steps`, or `total_steps` (train.steps) when that is 0.
    """
    total_steps = config.decay_steps or total_steps
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=config.lr * config.min_lr_ratio,
    )


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: everything but norm scales and biases."""

    def wants_decay(path, _leaf) -> bool:
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", str(last)))
        return str(name) not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Built once per run; the schedule is returned too so the trainer can log the learning rate."""
    schedule = make_schedule(config, total_steps)
    if config.name == "adamw":
        core = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=decay_mask)
    elif config.name == "lamb":
        core = optax.lamb(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                          weight_decay=config.weight_decay, mask=decay_mask)
    else:  # validate() rejects other names before we get here
        raise ValueError(f"unknown optimizer {config.name!r}")
    # Always a chain of two: clip_norm=0 (no clipping) and clip_norm>0 then give the same optimizer-state
    # tree (both states are EmptyState), so a run resumes whichever way the setting was changed.
    clip = optax.clip_by_global_norm(config.clip_norm) if config.clip_norm > 0 else optax.identity()
    return optax.chain(clip, core), schedule
