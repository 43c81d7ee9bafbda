"""Pure train and eval step functions. No jit here: the trainer compiles them with shardings.

A batch is a dict of [batch, length] arrays: inputs, targets, segment_ids, positions, weights; an
encoder-decoder's also holds its encoder side (models/build.ENCODER_KEYS, [batch, seq_len]).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from llm_jax.models.build import encoder_inputs, init_inputs
from llm_jax.train.losses import accuracy_sum, cross_entropy_sum, mean_loss


class TrainState(struct.PyTreeNode):
    """Everything that must survive a restart for the run to continue exactly."""

    step: jax.Array  # int32 scalar: steps taken so far (updates applied or skipped as non-finite)
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; each step folds in its step number


def init_state(rng: jax.Array, model, tx: optax.GradientTransformation, seq_len: int) -> TrainState:
    """Builds a fresh state. Under `jax.eval_shape` this also yields the boxed (logical) tree."""
    init_rng, train_rng = jax.random.split(rng)
    tokens, extra = init_inputs(model.config, seq_len)
    params = model.init({"params": init_rng, "dropout": init_rng}, tokens, **extra)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=train_rng)


def _logits(params, batch: dict[str, jax.Array], model, rng: jax.Array | None) -> jax.Array:
    deterministic = rng is None
    return model.apply(
        {"params": params},
        batch["inputs"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng},
        **encoder_inputs(model.config, batch),
    )


def _loss_sums(params, batch: dict[str, jax.Array], model, rng: jax.Array | None):
    return cross_entropy_sum(_logits(params, batch, model, rng), batch["targets"], batch["weights"])


def _split_micro(batch: dict[str, jax.Array], n_micro: int) -> dict[str, jax.Array]:
    """[B, L] -> [n_micro, B / n_micro, L], micro-batch i taking rows i, i + n, i + 2n, ...

    Strided rows keep every micro-batch spread over all batch shards of the mesh.
    """
    def split(x):
        b = x.shape[0] // n_micro
        return jnp.swapaxes(x.reshape((b, n_micro) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def update_unless_nonfinite(finite: jax.Array, tx: optax.GradientTransformation, grads: Any, opt_state: Any,
                            params: Any) -> tuple[Any, Any]:
    """(params, opt_state) after one optimizer update if `finite`, else as they were.

    A `lax.cond` rather than a select between old and new: XLA then runs only the branch taken,
    and the update writes each leaf in one pass. Selecting afterwards needs old and new states side
    by side and one more pass over both (on CPU ~50 ms of the baby GPT's 1.9 s step,
    docs/benchmarks.md).
    """
    def update(operands):
        grads, opt_state, params = operands
        updates, new_opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    def keep(operands):
        _, opt_state, params = operands
        # optax's step counters (its only integer leaves) advance anyway, as `state.step` does, so
        # its learning-rate schedule stays a function of the step.
        counters_advanced = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.integer) else x, opt_state)
        return params, counters_advanced

    return jax.lax.cond(finite, update, keep, (grads, opt_state, params))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model, tx: optax.GradientTransformation,
               schedule: optax.Schedule, grad_accum: int = 1, use_dropout: bool = False,
               axis_name: str | None = None, param_shardings: Any = None, loss_fn=None):
    """One optimizer update over the whole batch, accumulated over `grad_accum` micro-batches.

    Gradients of loss *sums* are accumulated and divided once by the total target count, so the
    update equals that of one big batch however the batch is split or padded. Under `jax.pmap`,
    `axis_name` names the device axis: sums are added over devices before that one division, so
    replicated data parallelism makes the same update as the global batch on one device.

    With accumulation under FSDP, each weight must be gathered inside the loop, when its layer
    runs, and each gradient kept in its parameter's shards: `param_shardings` (the sharded path;
    None under pmap) pins every gradient to them explicitly, and the weights travel through the
    loop's carry (see `accumulate`). Measured with `llm-jax plan`, docs/benchmarks.md.

    `loss_fn(params, batch, model, rng) -> (loss sum, weight sum)`: None is the language-model loss;
    fine-tuning tasks pass theirs (train/task_steps.py).
    """
    def like_params(grads):
        if param_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, param_shardings)

    rng = jax.random.fold_in(state.rng, state.step) if use_dropout else None
    if rng is not None and axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))  # each replica its own dropout
    grad_fn = jax.value_and_grad(_loss_sums if loss_fn is None else loss_fn, has_aux=True)

    if grad_accum == 1:
        (loss_sum, weight_sum), grads = grad_fn(state.params, batch, model, rng)
    else:
        micro = _split_micro(batch, grad_accum)
        zeros = like_params(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))

        def accumulate(carry, xs):
            params, grads_acc, loss_acc, weight_acc = carry
            i, micro_batch = xs
            micro_rng = None if rng is None else jax.random.fold_in(rng, i)
            # XLA hoists loop-invariant work out of loops: FSDP's all-gather of every weight would run
            # once before the loop and hold all weights whole through it (measured: accumulation then
            # needed more memory than no accumulation). Passing the weights through the carry behind a
            # barrier makes them new in each iteration, so each layer is gathered when it is used.
            params = jax.lax.optimization_barrier(params)
            (loss_sum, weight_sum), grads = grad_fn(params, micro_batch, model, micro_rng)
            grads = like_params(grads)
            grads_acc = like_params(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads))
            return (params, grads_acc, loss_acc + loss_sum, weight_acc + weight_sum), None

        init = (state.params, zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (_, grads, loss_sum, weight_sum), _ = jax.lax.scan(accumulate, init, (jnp.arange(grad_accum), micro))
    if axis_name is not None:
        grads, loss_sum, weight_sum = jax.lax.psum((grads, loss_sum, weight_sum), axis_name)

    scale = 1.0 / jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, state.params)
    grad_norm = optax.tree.norm(grads)
    # Non-finite guard, on the device so it costs no host sync: a NaN/Inf loss or gradient leaves
    # the parameters and the optimizer's moments as they were.
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
    params, opt_state = update_unless_nonfinite(finite, tx, grads, state.opt_state, state.params)
    # A finite gradient gives a finite AdamW or LAMB update, but one so large (a learning rate far too
    # high) that the parameters overflow is made: the step then counts as non-finite too, so it is
    # never saved, and the run stops after train.max_nonfinite_steps with its last good checkpoint.
    finite &= jnp.isfinite(optax.tree.norm(params))
    metrics = {
        "loss": mean_loss(loss_sum, weight_sum),
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "tokens": weight_sum,
        "nonfinite": 1.0 - finite.astype(jnp.float32),  # 1.0: this step's update was skipped
    }
    # The step counter advances either way, so the data order and the schedule stay aligned.
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(params, batch: dict[str, jax.Array], *, model) -> dict[str, jax.Array]:
    """Sums over one batch's real targets: "loss", "correct" (top-1 hits) and "weight" (how many).
    The caller adds them over batches and divides once."""
    logits = _logits(params, batch, model, None)
    loss_sum, weight_sum = cross_entropy_sum(logits, batch["targets"], batch["weights"])
    correct_sum, _ = accuracy_sum(logits, batch["targets"], batch["weights"])
    return {"loss": loss_sum, "correct": correct_sum, "weight": weight_sum}
