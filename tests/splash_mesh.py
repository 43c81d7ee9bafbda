"""Three train steps of a tiny grouped-query model: with model.attention=splash on a data x fsdp x
tensor = 2 x 2 x 2 mesh (the kernel inside shard_map, run by the Pallas interpreter on 8 fake CPU
devices), and with the explicit attention on one device. Prints the losses and gradient norms, and
the largest difference from the explicit attention on a mesh whose tensor axis splits the query
heads but not the key/value heads.

Started by test_transformer.py in a fresh process, because the fake device count must be set before
JAX starts: python tests/splash_mesh.py  (with XLA_FLAGS=--xla_force_host_platform_device_count=8)
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.commands import bench
from llm_jax.config import DEFAULT_AXIS_RULES, load_config
from llm_jax.kernels import splash_attention
from llm_jax.models.layers import causal_segment_mask, xla_attention
from llm_jax.parallel import mesh as mesh_lib
from llm_jax.train import loop

STEPS = 3


def run(attention: str, mesh: dict, devices: list) -> dict:
    config = load_config("configs/tiny.yaml", [
        f"model.attention={attention}", "model.n_heads=8", "model.n_kv_heads=4", "train.seq_len=128",
        "train.batch_size=8", "optimizer.lr=1e-2", "optimizer.warmup_steps=1", f"train.steps={STEPS}",
        *[f"mesh.{k}={v}" for k, v in mesh.items()]])
    setup = loop.build(config, mesh=mesh_lib.make_mesh(config, devices), with_data=False)
    steps = loop.compile_steps(setup)
    state = steps.to_loop(loop.create_state(setup))
    losses, grad_norms = [], []
    with setup.context():
        for _ in range(STEPS):  # one batch, so the loss falls
            state, metrics = steps.train(state, steps.put_batch(bench.synthetic_batch(config, seed=0)))
            losses.append(float(metrics["loss"]))
            grad_norms.append(float(metrics["grad_norm"]))
    return {"losses": losses, "grad_norms": grad_norms}


def uneven_heads_difference() -> float:
    """4 query heads over tensor=4, 2 KV heads that tensor=4 cannot split: both must stay whole."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 128, heads, 8)), jnp.float32) for heads in (4, 2, 2))
    segment_ids = jnp.asarray(np.repeat([[1, 2], [1, 1]], 64, axis=1), jnp.int32)
    mesh = jax.make_mesh((2, 1, 4), mesh_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_AXIS_RULES):
        got = jax.jit(lambda q, k, v: splash_attention.causal_attention(q, k, v, segment_ids, interpret=True))(q, k, v)
    expected = xla_attention(q, k, v, causal_segment_mask(segment_ids, 128))
    return float(jnp.max(jnp.abs(got - expected)))


if __name__ == "__main__":
    print(json.dumps({
        "xla_single": run("xla", dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
        "splash_mixed222": run("splash", dict(data=2, fsdp=2, tensor=2), jax.devices()),
        "uneven_heads_difference": uneven_heads_difference(),
    }))
