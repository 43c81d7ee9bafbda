"""cuDNN attention on a GPU, packed documents included: values and gradients against the explicit
attention, and the time of one forward + backward pass of each implementation.

    python scripts/gpu_attention_check.py                       # the llama_1b shape: 8 x 2048, 16 heads / 8 KV, 128
    python scripts/gpu_attention_check.py --batch 2 --length 512 --rounds 3

Rows are packed with documents of random lengths (and trailing padding, segment 0), as the data
pipeline packs them. The reference is `layers.xla_attention` with the document mask in float32;
`model.attention=cudnn` (`layers.fused_attention`) runs in bfloat16, packed rows through cuDNN's
ragged layout (offsets and lengths per row), causal (decoders) and bidirectional (encoders).
Each line printed is one JSON object. On a machine without a GPU the script says so and stops.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config.schema import CUDNN_DOCUMENTS_PER_ROW
from llm_jax.models import layers


def packed_segment_ids(batch: int, length: int, seed: int) -> np.ndarray:
    """int32 [B, L]: documents 1, 2, ... of random lengths (16 to L/2), then padding (0) in the
    last few positions of odd rows."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        end = length - (rng.integers(1, length // 16) if row % 2 else 0)
        start, doc = 0, 1
        while start < end:
            size = min(int(rng.integers(16, length // 2)), end - start)
            ids[row, start:start + size] = doc
            start, doc = start + size, doc + 1
    return ids


def reference(q, k, v, segment_ids, causal):
    mask = (layers.causal_segment_mask if causal else layers.segment_mask)(segment_ids, q.shape[1])
    return layers.xla_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)


def loss_and_grads(attention):
    def loss(q, k, v, w):
        return jnp.sum(attention(q, k, v).astype(jnp.float32) * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def seconds(fn, args, rounds: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(json.dumps({"jax": jax.__version__, "device": device.device_kind, "platform": device.platform}), flush=True)
    if device.platform != "gpu":
        print(json.dumps({"skipped": "no GPU: cuDNN attention runs on a GPU only"}))
        return

    b, length, h, kv, d = args.batch, args.length, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, length, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, length, kv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, length, kv, d), jnp.bfloat16)
    w = jax.random.normal(keys[3], (b, length, h, d), jnp.float32)
    segment_ids = jnp.asarray(packed_segment_ids(b, length, seed=1))
    documents = int(sum(len(set(row.tolist()) - {0}) for row in np.asarray(segment_ids)))
    # The kernel is compiled for this many runs per row: documents (model.max_documents_per_row) + padding.
    runs = CUDNN_DOCUMENTS_PER_ROW + 1
    assert max(len(set(row.tolist())) for row in np.asarray(segment_ids)) <= runs

    for causal in (True, False):
        fused = functools.partial(layers.fused_attention, segment_ids_BL=segment_ids, platform="gpu", causal=causal,
                                  max_runs=runs)
        explicit = functools.partial(reference, segment_ids=segment_ids, causal=causal)
        cudnn, ref = loss_and_grads(fused), loss_and_grads(explicit)
        out_c, out_r = jax.jit(fused)(q, k, v), jax.jit(explicit)(q, k, v)
        hlo = jax.jit(fused).lower(q, k, v).as_text()
        (_, grads_c), (_, grads_r) = cudnn(q, k, v, w), ref(q, k, v, w)
        assert out_c.shape == out_r.shape and all(a.shape == b.shape for a, b in zip(grads_c, grads_r))
        scale = float(jnp.max(jnp.abs(out_r)))
        result = {
            "check": "values", "causal": causal, "shape": [b, length, h, kv, d], "documents": documents,
            "cudnn_custom_call": "cudnn" in hlo.lower(),
            "out_max_abs_diff": float(jnp.max(jnp.abs(out_c.astype(jnp.float32) - out_r))), "out_max_abs": scale,
        }
        for name, gc, gr in zip(("dq", "dk", "dv"), grads_c, grads_r):
            gr = gr.astype(jnp.float32)
            result[f"{name}_max_abs_diff"] = float(jnp.max(jnp.abs(gc.astype(jnp.float32) - gr)))
            result[f"{name}_rel_l2"] = float(jnp.linalg.norm(gc.astype(jnp.float32) - gr) / jnp.linalg.norm(gr))
        print(json.dumps(result), flush=True)

    # Speed of one forward + backward pass, bfloat16, causal.
    variants = {
        "cudnn_packed": lambda q, k, v: layers.fused_attention(q, k, v, segment_ids, "gpu", True, runs),
        "cudnn_one_document": lambda q, k, v: layers.fused_attention(q, k, v, None, "gpu", True),
        "cudnn_dense_mask": lambda q, k, v: layers._masked_attention(q, k, v, segment_ids, "cudnn", True),
        "xla_explicit": lambda q, k, v: layers.xla_attention(
            q, k, v, layers.causal_segment_mask(segment_ids, length)),
    }
    # Forward 4 B H L^2 D (QK^T and PV), backward twice that; causal: half of the square is needed.
    causal_flops = 6 * b * h * length * length * d
    for name, fn in variants.items():
        try:
            s = seconds(loss_and_grads(fn), (q, k, v, w), args.rounds)
            print(json.dumps({"bench": name, "fwd_bwd_ms": round(s * 1e3, 3),
                              "causal_tflops": round(causal_flops / s / 1e12, 1)}), flush=True)
        except Exception as e:  # report and go on: one variant's failure must not hide the others
            print(json.dumps({"bench": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}),
                  flush=True)


if __name__ == "__main__":
    main()
