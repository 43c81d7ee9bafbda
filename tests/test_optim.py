import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax.config import OptimizerConfig
from llm_jax.optim import decay_mask, make_optimizer, make_schedule


def test_schedule_warms_up_then_decays_to_the_floor():
    config = OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    schedule = make_schedule(config, total_steps=100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    assert float(schedule(100)) == pytest.approx(0.1)


def test_decay_mask_spares_norms_and_biases():
    params = {"block": {"attn": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
                        "norm": {"scale": jnp.ones((3, 2))}}, "embed": {"embedding": jnp.ones((4, 2))}}
    mask = decay_mask(params)
    assert mask["block"]["attn"]["kernel"] and mask["embed"]["embedding"]
    assert not mask["block"]["attn"]["bias"] and not mask["block"]["norm"]["scale"]


def test_lamb_trust_ratio_matches_a_hand_computation():
    lr, wd, eps = 0.1, 0.01, 1e-6
    config = OptimizerConfig(name="lamb", lr=lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=wd, eps=eps,
                             b1=0.9, b2=0.999, clip_norm=0.0)
    tx, _ = make_optimizer(config, total_steps=10)
    w = np.array([[1.0, -2.0], [3.0, 0.5]], np.float32)
    b = np.array([0.5, -0.25], np.float32)
    gw = np.array([[0.1, 0.2], [-0.3, 0.4]], np.float32)
    gb = np.array([0.05, -0.5], np.float32)
    params = {"dense": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
    grads = {"dense": {"kernel": jnp.asarray(gw), "bias": jnp.asarray(gb)}}
    updates, _ = tx.update(grads, tx.init(params), params)

    def lamb_update(p, g, decay):
        # Step 1 of Adam with bias correction: m_hat = g, v_hat = g^2.
        adam = g / (np.sqrt(g * g) + eps)
        u = adam + (wd * p if decay else 0.0)
        trust = np.linalg.norm(p) / np.linalg.norm(u)
        return -lr * trust * u

    np.testing.assert_allclose(updates["dense"]["kernel"], lamb_update(w, gw, True), rtol=1e-5)
    np.testing.assert_allclose(updates["dense"]["bias"], lamb_update(b, gb, False), rtol=1e-5)
    # The ratio is per layer: the kernel's update norm is lr * ||w||, not lr * ||u||.
    assert np.linalg.norm(updates["dense"]["kernel"]) == pytest.approx(lr * np.linalg.norm(w), rel=1e-5)


def test_adamw_clips_by_global_norm():
    config = OptimizerConfig(lr=1.0, warmup_steps=0, min_lr_ratio=1.0, clip_norm=1.0, weight_decay=0.0)
    tx, _ = make_optimizer(config, total_steps=10)
    params = {"w": jnp.zeros(4)}
    huge = {"w": jnp.full(4, 1e6)}
    small = {"w": jnp.full(4, 0.5)}  # global norm 1.0: exactly at the threshold
    up_huge, _ = tx.update(huge, tx.init(params), params)
    up_small, _ = tx.update(small, tx.init(params), params)
    # Adam normalises away the scale, so the first step is the same: clipping kept it finite.
    np.testing.assert_allclose(up_huge["w"], up_small["w"], rtol=1e-4)
    assert optax.tree.norm(up_huge) > 0


def test_clipping_on_or_off_gives_the_same_state_tree():
    """A run resumes with clip_norm changed between 0 and a positive value: the state tree is the same."""
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    trees = [jax.tree.structure(make_optimizer(OptimizerConfig(clip_norm=clip), 10)[0].init(params))
             for clip in (0.0, 1.0)]
    assert trees[0] == trees[1]
