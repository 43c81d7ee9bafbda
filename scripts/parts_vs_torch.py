"""The baby GPT's step taken apart: each part alone, forward + backward, llm_jax's ops against PyTorch's.

Parts at the baby GPT's shapes (16 x 256 tokens, d_model 384, 6 heads, d_ff 1536, vocabulary 8192):
one layer's MLP, one layer's attention, one LayerNorm, the tied logits with cross-entropy, and AdamW
with clipping over 13.9M parameters. llm_jax's side uses what the model uses: the CPU kernels
(cpu_kernels.py) for attention and matmuls where they build. Then the step's matmul shapes alone,
in GFLOP/s: XLA's own dot, llm_jax's matmul kernel (OpenBLAS) and PyTorch's (MKL). Each side runs
in its own interpreter (JAX_PY, TORCH_PY as in bench_vs_torch.py), one after the other; times are
the lower quartile of `--repeats` calls.

    python scripts/parts_vs_torch.py
    taskset -c 0 python scripts/parts_vs_torch.py --threads 1      # one core each
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

B, L, E, H, F, V = 16, 256, 384, 6, 1536, 8192
D, N = E // H, B * L
PARAMS = 13_891_584
MATMULS = {  # name: (einsum, lhs shape, rhs shape, PyTorch's form: transpose lhs, transpose rhs)
    "fc forward": ("nk,ko->no", (N, E), (E, F), False, False),
    "fc input gradient": ("no,ko->nk", (N, F), (E, F), False, True),
    "fc weight gradient": ("nk,no->ko", (N, E), (N, F), True, False),
    "proj weight gradient": ("nk,no->ko", (N, F), (N, E), True, False),
    "logits forward": ("nk,vk->nv", (N, E), (V, E), False, True),
    "logits input gradient": ("nv,vk->nk", (N, V), (V, E), False, False),
    "tied-embedding gradient": ("nv,nk->vk", (N, V), (N, E), True, False),
}


def timed(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 4]


def matmul_flops(equation: str, lhs: tuple, rhs: tuple) -> int:
    sizes = {}
    for letters, shape in zip(equation.split("->")[0].split(","), (lhs, rhs)):
        sizes.update(zip(letters, shape))
    return 2 * math.prod(sizes.values())


def data(seed: int, *shape, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def run_jax(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from llm_jax.kernels import blocked_attention, cpu_kernels, host_memory
    from llm_jax.models import layers

    host_memory.tune_malloc_for_xla_cpu()  # as `llm-jax` does

    def grad_time(fn, *args):
        step = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args)))))
        return timed(lambda: jax.block_until_ready(step(*args)), repeats)

    kernels = layers.use_cpu_kernels(jnp.float32)
    matmul = cpu_kernels.matmul if kernels else jnp.matmul
    x = jnp.asarray(data(0, N, E))
    w1, w2 = jnp.asarray(data(1, E, F, scale=0.02)), jnp.asarray(data(2, F, E, scale=0.02))
    b1, b2 = jnp.zeros(F), jnp.zeros(E)
    parts = {"mlp": grad_time(lambda x, w1, b1, w2, b2: matmul(jax.nn.gelu(matmul(x, w1) + b1, approximate=True), w2)
                              + b2, x, w1, b1, w2, b2)}
    q, k, v = (jnp.asarray(data(s, B, L, H, D)) for s in (3, 4, 5))
    if kernels:
        attention = lambda q, k, v: cpu_kernels.causal_attention(q, k, v, None)
    else:
        mask = layers.causal_segment_mask(None, L)
        attention = lambda q, k, v: blocked_attention.causal_attention(q, k, v, mask)
    parts["attention core"] = grad_time(attention, q, k, v)
    scale, bias = jnp.ones(E), jnp.zeros(E)

    def layer_norm(x, scale, bias):
        centred = x - jnp.mean(x, -1, keepdims=True)
        return centred * jax.lax.rsqrt(jnp.mean(centred * centred, -1, keepdims=True) + 1e-5) * scale + bias

    parts["layer norm"] = grad_time(layer_norm, x, scale, bias)
    embedding = jnp.asarray(data(6, V, E, scale=0.02))
    targets = jnp.asarray(np.random.default_rng(7).integers(0, V, N))
    logits = (lambda x, e: cpu_kernels.matmul(x, e, transpose_b=True)) if kernels else (lambda x, e: x @ e.T)
    parts["logits + cross-entropy"] = grad_time(
        lambda x, e: optax.softmax_cross_entropy_with_integer_labels(logits(x, e), targets).mean(), x, embedding)
    params = [jnp.asarray(data(8 + i, PARAMS // 8)) for i in range(8)]
    grads = [jnp.asarray(data(16 + i, PARAMS // 8)) for i in range(8)]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1))
    opt_state = tx.init(params)

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    parts["adamw + clipping"] = timed(lambda: jax.block_until_ready(update(params, opt_state, grads)), repeats)
    matmuls, kernel_matmuls = {}, {}
    for name, (equation, lhs, rhs, transpose_lhs, transpose_rhs) in MATMULS.items():
        a, b = jnp.asarray(data(30, *lhs)), jnp.asarray(data(31, *rhs))
        flops = matmul_flops(equation, lhs, rhs)
        product = jax.jit(lambda a, b, eq=equation: jnp.einsum(eq, a, b))
        seconds = timed(lambda product=product, a=a, b=b: jax.block_until_ready(product(a, b)), repeats)
        matmuls[name] = flops / seconds / 1e9
        if kernels:
            call = jax.jit(lambda a, b, ta=transpose_lhs, tb=transpose_rhs: cpu_kernels._matmul_call(a, b, ta, tb))
            seconds = timed(lambda call=call, a=a, b=b: jax.block_until_ready(call(a, b)), repeats)
            kernel_matmuls[name] = flops / seconds / 1e9
    return {"parts_ms": {k: 1e3 * s for k, s in parts.items()}, "matmul_gflops": matmuls,
            "kernel_matmul_gflops": kernel_matmuls}


def run_torch(repeats: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as tf

    torch.set_num_threads(threads)

    def grad_time(fn, *inputs):
        def step():
            out = fn(*inputs)
            out.backward(torch.ones_like(out))
        return timed(step, repeats)

    x = torch.tensor(data(0, N, E), requires_grad=True)
    fc, proj = torch.nn.Linear(E, F), torch.nn.Linear(F, E)
    parts = {"mlp": grad_time(lambda x: proj(tf.gelu(fc(x), approximate="tanh")), x)}
    q, k, v = (torch.tensor(data(s, B, H, L, D), requires_grad=True) for s in (3, 4, 5))
    parts["attention core"] = grad_time(lambda q, k, v: tf.scaled_dot_product_attention(q, k, v, is_causal=True),
                                        q, k, v)
    parts["layer norm"] = grad_time(torch.nn.LayerNorm(E), x)
    embedding = torch.tensor(data(6, V, E, scale=0.02), requires_grad=True)
    targets = torch.tensor(np.random.default_rng(7).integers(0, V, N))
    parts["logits + cross-entropy"] = grad_time(lambda x: tf.cross_entropy(x @ embedding.t(), targets), x)
    params = [torch.tensor(data(8 + i, PARAMS // 8), requires_grad=True) for i in range(8)]
    for i, p in enumerate(params):
        p.grad = torch.tensor(data(16 + i, PARAMS // 8))
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def update():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    parts["adamw + clipping"] = timed(update, repeats)
    matmuls = {}
    with torch.no_grad():
        for name, (equation, lhs, rhs, transpose_lhs, transpose_rhs) in MATMULS.items():
            # the forms autograd uses: matmuls of (transposed) views, which go to MKL's sgemm
            a, b = torch.tensor(data(30, *lhs)), torch.tensor(data(31, *rhs))
            left, right = (a.t() if transpose_lhs else a), (b.t() if transpose_rhs else b)
            seconds = timed(lambda left=left, right=right: left @ right, repeats)
            matmuls[name] = matmul_flops(equation, lhs, rhs) / seconds / 1e9
    return {"parts_ms": {k: 1e3 * s for k, s in parts.items()}, "matmul_gflops": matmuls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="PyTorch threads")
    args = parser.parse_args()
    if args.impl == "jax":
        print(json.dumps(run_jax(args.repeats)))
        return
    if args.impl == "torch":
        print(json.dumps(run_torch(args.repeats, args.threads)))
        return

    results = {}
    for impl, python in (("jax", os.environ.get("JAX_PY", sys.executable)),
                         ("torch", os.environ.get("TORCH_PY", "/tmp/torchvenv/bin/python"))):
        command = [python, __file__, "--impl", impl, "--repeats", str(args.repeats), "--threads", str(args.threads)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[impl] = json.loads(output.strip().splitlines()[-1])
    print(f"{'part (forward + backward)':28s} {'llm_jax ms':>10s} {'torch ms':>9s} {'torch/jax':>9s}")
    for part, ms in results["jax"]["parts_ms"].items():
        other = results["torch"]["parts_ms"][part]
        print(f"{part:28s} {ms:10.1f} {other:9.1f} {other / ms:9.2f}")
    print(f"\n{'matmul (GFLOP/s)':28s} {'XLA dot':>8s} {'kernel':>7s} {'torch':>6s}")
    for name, gflops in results["jax"]["matmul_gflops"].items():
        kernel = results["jax"]["kernel_matmul_gflops"].get(name, float("nan"))
        print(f"{name:28s} {gflops:8.0f} {kernel:7.0f} {results['torch']['matmul_gflops'][name]:6.0f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
