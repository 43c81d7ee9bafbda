"""A/B of the baby-GPT train step under code variants, interleaved step by step in one process.

Keeps the earlier implementations of the parts that were tuned for speed, and swaps them in:
- `full_square_attention`: `model.attention=xla` as it was, `layers.xla_attention` over the whole
  [L, L] score matrix with JAX's own backward (now: `blocked_attention.causal_attention`);
- `3d_matmuls`: projections and logits as 3-D dot_generals over [B, L, ...] (now: tokens flattened
  to 2-D first);
- `blocked_attention`: the CPU kernels (cpu_kernels.py) switched off, so training attention is the
  blocked XLA attention and the matmuls are XLA's own;
- `xla_matmuls`: only the CPU matmul kernel switched off (the fused attention kernel stays);
- `xla_norms`: only the CPU norm kernel switched off, norms as XLA's own ops (the other kernels stay);
- `select_guard`: the non-finite guard as it was, a select between the old and the new state after
  the update (now: `steps.update_unless_nonfinite`, a `lax.cond`);
- `before`: `3d_matmuls`, `full_square_attention` and `select_guard` together, i.e. the step before
  any tuning; `after`: the code as it is.
Every variant is compiled once, then the variants take turns step by step, so machine load hits
all alike. Reports the minimum and median wall time, the CPU time, and the speed-ups over the
first variant.

    python scripts/step_variants.py --rounds 10                        # before vs after
    python scripts/step_variants.py --variants before 3d_matmuls full_square_attention blocked_attention after
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llm_jax.commands import bench
from llm_jax.config import load_config
from llm_jax.kernels import host_memory
from llm_jax.models import layers
from llm_jax.train import steps


class Dense3D(layers.Dense):
    """layers.Dense before tuning: one dot_general over all of x's leading dims."""

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.n_in:]
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                                   self.kernel_axes),
                            (*in_shape, *self.features), self.param_dtype)
        x_dims = tuple(range(x.ndim - self.n_in, x.ndim))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                ((x_dims, tuple(range(self.n_in))), ((), ())),
                                preferred_element_type=self.out_dtype or self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[self.n_in:]),
                              self.features, self.param_dtype)
            y = y + bias.astype(y.dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
        return y


def attend_3d(self, x_BLE):
    """layers.Embed.attend before tuning."""
    return jnp.einsum("ble,ve->blv", x_BLE.astype(self.dtype), self.embedding.astype(self.dtype),
                      preferred_element_type=jnp.float32)


def full_square_attention(q_BLHD, k_BLKD, v_BLKD, mask_B1LL):
    return layers.xla_attention(q_BLHD, k_BLKD, v_BLKD, mask_B1LL)


class XlaNorm(layers.Norm):
    """layers.Norm in XLA's own ops, as before the CPU norm kernel."""

    @nn.compact
    def __call__(self, x):
        def vector(name, init):
            return self.param(name, nn.with_logical_partitioning(init, ("embed",)), (x.shape[-1],),
                              self.param_dtype).reshape((1,) * (x.ndim - 1) + (-1,))

        x32 = x.astype(jnp.float32)
        if not self.rms:
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        y = y * vector("scale", nn.initializers.ones)
        if not self.rms:
            y = y + vector("bias", nn.initializers.zeros)
        return y.astype(self.dtype)


def select_guard(finite, tx, grads, opt_state, params):
    """steps.update_unless_nonfinite before tuning: update, then pick old or new leaf by leaf."""
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = finite & jnp.isfinite(optax.tree.norm(updates))

    def pick(new, old):
        return new if jnp.issubdtype(new.dtype, jnp.integer) else jnp.where(finite, new, old)

    return jax.tree.map(pick, (new_params, new_opt_state), (params, opt_state))


@contextlib.contextmanager
def variant(name: str):
    """Swaps the earlier implementations into `layers` while the variant's step is traced."""
    saved = (layers.Dense, layers.Embed.attend, layers.causal_attention, layers.use_cpu_kernels,
             layers.use_cpu_matmul, layers.Norm, steps.update_unless_nonfinite)
    if name in ("before", "3d_matmuls"):
        layers.Dense, layers.Embed.attend = Dense3D, attend_3d
    if name in ("before", "full_square_attention"):
        layers.causal_attention = full_square_attention
    if name in ("before", "3d_matmuls", "full_square_attention", "blocked_attention"):
        layers.use_cpu_kernels = lambda dtype: False  # these variants predate the C++ kernels
    if name == "xla_matmuls":
        layers.use_cpu_matmul = lambda dtype, out_dtype=None: False
    if name == "xla_norms":
        layers.Norm = XlaNorm
    if name in ("before", "select_guard"):
        steps.update_unless_nonfinite = select_guard
    try:
        yield
    finally:
        (layers.Dense, layers.Embed.attend, layers.causal_attention, layers.use_cpu_kernels,
         layers.use_cpu_matmul, layers.Norm, steps.update_unless_nonfinite) = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["before", "after"],
                        choices=["before", "3d_matmuls", "full_square_attention", "blocked_attention",
                                 "xla_matmuls", "xla_norms", "select_guard", "after"])
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of configs/baby_gpt.yaml")
    args = parser.parse_args()
    host_memory.tune_malloc_for_xla_cpu()  # as `llm-jax bench` does, before JAX starts its threads
    config = load_config("configs/baby_gpt.yaml", ["workdir=/tmp/llm_jax_step_variants", *args.overrides])

    compiled = {}
    for name in args.variants:
        with variant(name):
            _, step_fn, state, batch, _ = bench.compile_train_step(config)
        for _ in range(2):  # warm-up
            state, metrics = step_fn(state, batch)
        print(f"{name}: loss after 2 steps {float(metrics['loss']):.6f}", flush=True)
        compiled[name] = [step_fn, state, batch]

    wall = {name: [] for name in args.variants}
    cpu = {name: [] for name in args.variants}
    for _ in range(args.rounds):
        for name in args.variants:
            step_fn, state, batch = compiled[name]
            t0, c0 = time.perf_counter(), time.process_time()
            state, metrics = step_fn(state, batch)
            jax.block_until_ready(metrics)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            compiled[name][1] = state

    base = args.variants[0]
    tokens = config.train.batch_size * config.train.seq_len
    print(f"\n{'variant':22s} {'min s':>7s} {'median s':>9s} {'tokens/s':>9s} {'cpu s':>7s} {'speed-up':>9s} "
          f"{'cpu speed-up':>12s}")
    summary = {}
    for name in args.variants:
        speedup = min(wall[base]) / min(wall[name])
        cpu_speedup = statistics.median(cpu[base]) / statistics.median(cpu[name])
        summary[name] = {"min_step_s": min(wall[name]), "median_step_s": statistics.median(wall[name]),
                         "tokens_per_sec": tokens / statistics.median(wall[name]), "speedup": speedup,
                         "cpu_speedup": cpu_speedup}
        print(f"{name:22s} {min(wall[name]):7.3f} {statistics.median(wall[name]):9.3f} "
              f"{summary[name]['tokens_per_sec']:9.0f} {statistics.median(cpu[name]):7.3f} {speedup:9.3f} "
              f"{cpu_speedup:12.3f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
