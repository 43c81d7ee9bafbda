"""Attention on TPU through the Pallas splash attention kernel (`model.attention=splash`).

Splash ("sparse flash") attention computes only the blocks of the score matrix that its static
mask leaves visible, so causal attention costs about half of the full square, and never holds a
[L, S] array in HBM. Documents packed into one row (segment ids) are masked inside the kernel.
An encoder's bidirectional attention is the same kernel with a full static mask (`causal=False`):
then only the segment ids mask.

The kernel works on one sequence and one key/value head at a time: q [G, L, D] against k and v
[S, D] (its multi-query form), so grouped-query attention needs no repeated keys. Here it is
vmapped over batch rows and key/value heads. It does not scale the scores: q is multiplied by
1/sqrt(D) first, as `layers.xla_attention` does.

XLA cannot partition a Pallas call, so under a mesh the kernel runs inside `jax.shard_map`: every
device takes its own batch rows and heads, as the logical-axis rules split them (batch over data
and fsdp, heads over tensor); the sequence is never split, so each device has whole rows.
`interpret=True` runs the same kernel in the Pallas interpreter on any backend: that is how the
tests check it against the explicit attention on a CPU.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P


def block_size(length: int) -> int:
    """Query and key rows per kernel block: the largest of 512, 256, 128 that divides `length`
    (the kernel tiles whole blocks, at least one 128-lane vector register wide)."""
    for block in (512, 256, 128):
        if length % block == 0:
            return block
    raise ValueError(f"model.attention=splash needs a sequence length that is a multiple of 128, got {length}")


def _kernel(length: int, group: int, causal: bool, interpret: bool):
    """The multi-query splash kernel for `group` query heads per key/value head, causal or full, L = S.

    Built anew at every trace: it holds its block masks as arrays of the trace it was made in."""
    block = block_size(length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                              block_kv_dq=block)
    head_mask = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    mask = splash.MultiHeadMask([head_mask for _ in range(group)])
    return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _local_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, causal: bool, interpret: bool):
    """Attention over the rows and heads this device holds; [B, L, H, D] in and out."""
    batch, length, heads, head_dim = q_BLHD.shape
    kv_heads = k_BSKD.shape[2]
    group = heads // kv_heads
    kernel = _kernel(length, group, causal, interpret)
    q_BKGLD = (q_BLHD * head_dim ** -0.5).reshape(batch, length, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    k_BKSD, v_BKSD = k_BSKD.transpose(0, 2, 1, 3), v_BSKD.transpose(0, 2, 1, 3)

    def one_row(q_KGLD, k_KSD, v_KSD, segment_ids_L):
        segments = None if segment_ids_L is None else splash.SegmentIds(q=segment_ids_L, kv=segment_ids_L)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q_KGLD, k_KSD, v_KSD)

    out_BKGLD = jax.vmap(one_row)(q_BKGLD, k_BKSD, v_BKSD, segment_ids_BL)  # None maps to None
    return out_BKGLD.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim).astype(q_BLHD.dtype)


def causal_attention(q_BLHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, segment_ids_BL: jax.Array | None,
                     interpret: bool = False) -> jax.Array:
    """Causal grouped-query attention within documents, [B, L, H, D]: the same function as
    `layers.xla_attention` with `layers.causal_segment_mask(segment_ids_BL)`."""
    return attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, causal=True, interpret=interpret)


def attention(q_BLHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, segment_ids_BL: jax.Array | None,
              causal: bool = True, interpret: bool = False) -> jax.Array:
    """Grouped-query attention within documents, [B, L, H, D]; causal=False: in both directions, the
    same function as `layers.xla_attention` with `layers.segment_mask(segment_ids_BL)`."""
    args = (q_BLHD, k_BSKD, v_BSKD) if segment_ids_BL is None else (q_BLHD, k_BSKD, v_BSKD, segment_ids_BL)

    def attend(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL=None):
        return _local_attention(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, causal, interpret)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attend(*args)
    names = (("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim"),
             ("batch", "length", "kv_heads", "head_dim"), ("batch", "length"))
    specs = [_spec(mesh, x.shape, axes) for x, axes in zip(args, names)]
    if specs[0][2] != specs[1][2]:  # query heads split, KV heads not (or the reverse): the groups would
        specs[:3] = [P(*spec[:2], None, *spec[3:]) for spec in specs[:3]]  # not line up; keep heads whole
    return jax.shard_map(attend, in_specs=tuple(specs), out_specs=specs[0], check_vma=False)(*args)


def _spec(mesh, shape: tuple[int, ...], logical_axes: tuple[str, ...]) -> P:
    """The partition spec the logical-axis rules give, except that a dimension its mesh axes do not
    divide (the batch of 1 that `init` traces, heads fewer than tensor shards) stays whole."""
    spec = nn.logical_to_mesh_axes(logical_axes)
    dims = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        shards = math.prod(mesh.shape[name] for name in names)
        dims.append(axes if shards > 1 and size % shards == 0 else None)
    return P(*dims)
