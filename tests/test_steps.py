import functools

import jax
import numpy as np
import pytest
from flax import linen as nn

from llm_jax.config import ModelConfig, OptimizerConfig
from llm_jax.models.decoder import Transformer
from llm_jax.train.optim import make_optimizer
from llm_jax.train.steps import eval_step, init_state, train_step

MODEL = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_len=16)


def _batch(batch_size=4, length=8, seed=0, pad_last=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, MODEL.vocab_size, size=(batch_size, length + 1)).astype(np.int32)
    weights = np.ones((batch_size, length), np.float32)
    segment_ids = np.ones((batch_size, length), np.int32)
    if pad_last:
        weights[:, -pad_last:] = 0
        segment_ids[:, -pad_last:] = 0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights, "segment_ids": segment_ids,
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length)).copy()}


def _setup(model_config=MODEL, opt=OptimizerConfig(lr=1e-2, warmup_steps=0)):
    model = Transformer(model_config)
    tx, schedule = make_optimizer(opt, total_steps=100)
    state = jax.jit(lambda r: nn.unbox(init_state(r, model, tx, seq_len=8)))(jax.random.key_data(jax.random.key(0)))
    return model, tx, schedule, state


def test_gradient_accumulation_equals_one_big_batch():
    model, tx, schedule, state = _setup()
    batch = _batch(pad_last=3)
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule)
    whole, m_whole = jax.jit(functools.partial(step, grad_accum=1))(state, batch)
    # The sharded path pins the gradients to the parameters' shardings (here one device: all whole).
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state.params)
    split, m_split = jax.jit(functools.partial(step, grad_accum=2, param_shardings=shardings))(state, batch)
    # pmap: the same step with a device axis and no shardings.
    stacked = jax.tree.map(lambda x: x[None], (state, batch))
    pmapped, m_pmapped = jax.pmap(functools.partial(step, grad_accum=2, axis_name="d"), axis_name="d")(*stacked)
    pmapped, m_pmapped = jax.tree.map(lambda x: x[0], (pmapped, m_pmapped))
    for other, m_other in ((split, m_split), (pmapped, m_pmapped)):
        np.testing.assert_allclose(m_other["loss"], m_whole["loss"], rtol=1e-5)
        np.testing.assert_allclose(m_other["grad_norm"], m_whole["grad_norm"], rtol=1e-4)
        for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(other.params)):
            # Adam steps are ~1e-2, so a real mismatch shows; Adam divides by sqrt(v), so a weight
            # with a near-zero gradient turns summation-order rounding into ~2e-5.
            np.testing.assert_allclose(a, b, atol=1e-4)
        assert int(other.step) == 1


def test_train_steps_lower_the_loss_on_a_fixed_batch():
    model, tx, schedule, state = _setup()
    batch = _batch()
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule))
    first = None
    for _ in range(20):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < first - 1.0
    assert np.isfinite(float(metrics["grad_norm"]))


def test_dropout_uses_a_per_step_key():
    model_config = ModelConfig(**{**MODEL.__dict__, "dropout": 0.5})
    model, tx, schedule, state = _setup(model_config)
    batch = _batch()
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule, use_dropout=True))
    _, m1 = step(state, batch)
    _, m1_again = step(state, batch)
    state2 = state.replace(step=state.step + 1)
    _, m2 = step(state2, batch)
    assert float(m1["loss"]) == float(m1_again["loss"])  # deterministic given the step
    assert float(m1["loss"]) != pytest.approx(float(m2["loss"]), abs=1e-6)  # a new mask each step


def test_eval_step_counts_only_real_targets():
    model, _, _, state = _setup()
    batch = _batch(pad_last=3)
    sums = eval_step(state.params, batch, model=model)
    assert float(sums["weight"]) == 4 * 5
    assert float(sums["loss"]) / float(sums["weight"]) == pytest.approx(np.log(MODEL.vocab_size), rel=0.2)
    # Top-1 hits over the real targets only: make every real target the model's own first choice.
    logits = model.apply({"params": state.params}, batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    hits = eval_step(state.params, {**batch, "targets": np.asarray(logits.argmax(-1))}, model=model)
    assert float(hits["correct"]) == 4 * 5
    assert float(sums["correct"]) < 4 * 5
