"""Building blocks against hand-written references: norms, positions, masks, attention."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import ModelConfig
from llm_jax.models.layers import (
    Dense,
    Mlp,
    Norm,
    apply_rope,
    causal_segment_mask,
    fused_attention,
    segment_runs,
    sinusoidal_positions,
    to_dtype,
    xla_attention,
)


def _normal(seed, shape):
    """Inputs from numpy: eager jax.random costs a compile per shape on CPU."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_to_dtype_maps_config_strings():
    assert to_dtype("bfloat16") == jnp.bfloat16
    assert to_dtype("float16") == jnp.float16
    assert to_dtype("float32") == jnp.float32


def test_layer_norm_matches_formula_and_keeps_dtype():
    x = _normal(0, (2, 3, 8)) * 3.0 + 1.0
    module = Norm(eps=1e-5, dtype=jnp.bfloat16)
    variables = module.init(jax.random.key(0), x)
    params = nn.unbox(variables["params"])
    np.testing.assert_array_equal(params["scale"], np.ones(8))
    np.testing.assert_array_equal(params["bias"], np.zeros(8))
    params = {"scale": jnp.arange(8.0), "bias": jnp.full((8,), 0.5)}
    y = module.apply({"params": params}, x)
    assert y.dtype == jnp.bfloat16
    xn = np.asarray(x)
    expected = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5) * np.arange(8.0) + 0.5
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=2e-2, atol=2e-2)


def test_rms_norm_matches_formula_and_has_no_bias():
    x = _normal(1, (2, 3, 8)) * 3.0 + 1.0
    module = Norm(rms=True, eps=1e-6)
    params = nn.unbox(module.init(jax.random.key(0), x)["params"])
    assert set(params) == {"scale"}
    y = module.apply({"params": {"scale": jnp.full((8,), 2.0)}}, x)
    xn = np.asarray(x)
    expected = 2.0 * xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_dense_contracts_several_dims_and_adds_bias():
    x = _normal(2, (2, 3, 4, 5))
    module = Dense(features=(6,), kernel_axes=("heads", "head_dim", "embed"), n_in=2, use_bias=True)
    variables = module.init(jax.random.key(0), x)
    assert variables["params"]["kernel"].names == ("heads", "head_dim", "embed")
    assert variables["params"]["bias"].names == ("embed",)
    kernel = _normal(3, (4, 5, 6))
    bias = _normal(4, (6,))
    y = module.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    expected = np.einsum("bthd,hde->bte", np.asarray(x), np.asarray(kernel)) + np.asarray(bias)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_sinusoidal_positions_values():
    positions = jnp.array([[0, 1, 5]])
    table = sinusoidal_positions(positions, 8)
    assert table.shape == (1, 3, 8) and table.dtype == jnp.float32
    np.testing.assert_allclose(table[0, 0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
    inv_freq = 1.0 / 10000.0 ** (np.arange(4) / 4)
    np.testing.assert_allclose(table[0, 2], np.concatenate([np.sin(5 * inv_freq), np.cos(5 * inv_freq)]), rtol=1e-5)
    assert sinusoidal_positions(positions, 7).shape == (1, 3, 7)


def test_rope_scores_depend_only_on_position_difference():
    length, heads, head_dim = 6, 2, 8
    q = _normal(5, (1, length, heads, head_dim))
    k = _normal(6, (1, length, heads, head_dim))
    positions = jnp.arange(length)[None, :]

    def scores(q_positions, k_positions):
        q_rot = apply_rope(q, q_positions, 10000.0)
        k_rot = apply_rope(k, k_positions, 10000.0)
        return np.asarray(jnp.einsum("blhd,bshd->bhls", q_rot, k_rot))

    base = scores(positions, positions)
    np.testing.assert_allclose(scores(positions + 37, positions + 37), base, rtol=1e-4, atol=1e-4)
    # Shifting only the queries changes the differences, hence the scores.
    assert np.abs(scores(positions + 3, positions) - base).max() > 1e-2


def test_rope_is_identity_at_zero_and_preserves_norm():
    x = _normal(7, (1, 4, 2, 8))
    np.testing.assert_allclose(apply_rope(x, jnp.zeros((1, 4), jnp.int32), 10000.0), x, atol=1e-6)
    rotated = apply_rope(x, jnp.array([[1, 2, 3, 4]]), 10000.0)
    assert np.abs(np.asarray(rotated - x)).max() > 1e-2
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_causal_segment_mask_blocks_other_documents_and_padding():
    segment_ids = jnp.array([[1, 1, 2, 2, 0]])
    mask = np.asarray(causal_segment_mask(segment_ids, 5))[0, 0]
    expected = np.array([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ], bool)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(np.asarray(causal_segment_mask(None, 3))[0, 0], np.tril(np.ones((3, 3), bool)))


def _reference_attention(q, k, v, mask):
    """Multi-head attention with the key/value heads repeated for their query groups."""
    q, k, v, mask = (np.asarray(a, np.float64) for a in (q, k, v, mask))
    groups = q.shape[2] // k.shape[2]
    k = np.repeat(k, groups, axis=2)
    v = np.repeat(v, groups, axis=2)
    scores = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask > 0, scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", probs, v)


def test_grouped_query_attention_matches_repeated_heads_reference():
    batch, length, heads, kv_heads, head_dim = 2, 5, 4, 2, 8
    q = _normal(8, (batch, length, heads, head_dim))
    k = _normal(9, (batch, length, kv_heads, head_dim))
    v = _normal(10, (batch, length, kv_heads, head_dim))
    segment_ids = jnp.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]])
    mask = causal_segment_mask(segment_ids, length)
    out = jax.jit(xla_attention)(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), _reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_segments", [False, True])
def test_fused_attention_matches_xla_attention(with_segments):
    batch, length, heads, kv_heads, head_dim = 2, 6, 4, 2, 8
    q = _normal(11, (batch, length, heads, head_dim))
    k = _normal(12, (batch, length, kv_heads, head_dim))
    v = _normal(13, (batch, length, kv_heads, head_dim))
    segment_ids = jnp.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 3, 3]]) if with_segments else None
    expected = jax.jit(xla_attention)(q, k, v, causal_segment_mask(segment_ids, length))
    out = jax.jit(fused_attention)(q, k, v, segment_ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_segment_runs_describe_the_packed_documents():
    """The offsets and lengths handed to cuDNN mean the same mask as causal_segment_mask."""
    length = 12
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0, 0],  # three documents, then padding
                             [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # one document
                             [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])  # one token each: L runs
    offsets, lengths = jax.jit(segment_runs)(segment_ids)
    assert offsets.shape == (3, length + 1) and lengths.shape == (3, length)
    np.testing.assert_array_equal(offsets[0, :5], [0, 3, 5, 9, -1])
    np.testing.assert_array_equal(lengths[0, :5], [3, 2, 4, 3, -1])
    np.testing.assert_array_equal(offsets[1, :2], [0, -1])
    np.testing.assert_array_equal(lengths[2], np.ones(length))
    run_of = np.full((3, length), -1)
    for b in range(3):
        for r, (start, size) in enumerate(zip(np.asarray(offsets[b]), np.asarray(lengths[b]))):
            if size > 0:
                run_of[b, start:start + size] = r
    assert (run_of >= 0).all()  # every token lies in exactly one run
    index = np.arange(length)
    mask = (run_of[:, :, None] == run_of[:, None, :]) & (index[:, None] >= index[None, :])
    np.testing.assert_array_equal(mask, np.asarray(causal_segment_mask(segment_ids, length))[:, 0])


def _equations(jaxpr) -> list:
    """Every equation of a jaxpr, those of its sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _equations(sub)
    return found


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cudnn_with_segments_builds_no_square_mask(monkeypatch, kv_heads):
    """Traced as on a GPU (cuDNN's version and compute-capability checks answered as on a Hopper;
    nothing runs), forward and backward hold nothing [.., L, L]: the documents reach the kernel
    as offsets and lengths. Before, a [B, 1, L, L] mask and bias were built."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    batch, length, heads, head_dim = 2, 256, 4, 64
    q = jnp.zeros((batch, length, heads, head_dim), jnp.bfloat16)
    kv = jnp.zeros((batch, length, kv_heads, head_dim), jnp.bfloat16)
    segment_ids = jnp.ones((batch, length), jnp.int32)

    def loss(q, k, v):
        return fused_attention(q, k, v, segment_ids).astype(jnp.float32).sum()

    equations = _equations(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, kv, kv).jaxpr)
    names = {eqn.primitive.name for eqn in equations}
    # The fused kernel is what was traced, forward and backward.
    assert {"dot_product_attention_fwd_wrapper", "dot_product_attention_bwd_wrapper"} <= names
    square = [(eqn.primitive.name, var.aval.shape) for eqn in equations for var in eqn.outvars
              if tuple(getattr(var.aval, "shape", ())[-2:]) == (length, length)]
    assert square == []


def test_cudnn_before_hopper_falls_back_to_a_mask(monkeypatch):
    """cuDNN's packed layout needs compute capability 9.0: on an older GPU the documents become a
    dense mask again (with a warning) rather than an error."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: capability == "8.0")
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    q = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    segment_ids = jnp.ones((1, 16), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda q: fused_attention(q, q, q, segment_ids, platform="gpu"))(q).jaxpr
    equations = _equations(jaxpr)
    assert "dot_product_attention_fwd_wrapper" in {eqn.primitive.name for eqn in equations}
    assert any(tuple(getattr(v.aval, "shape", ())[-2:]) == (16, 16) for eqn in equations for v in eqn.outvars)


@pytest.mark.parametrize("arch,names", [("gpt2", {"fc", "proj"}), ("llama", {"gate", "up", "proj"})])
def test_mlp_flavours(arch, names):
    config = ModelConfig(arch=arch, d_model=8, n_heads=2, d_ff=16, n_layers=2)
    x = _normal(14, (1, 3, 8))
    params = nn.unbox(Mlp(config).init(jax.random.key(0), x)["params"])
    assert set(params) == names
    for name in names:
        assert ("bias" in params[name]) == (arch == "gpt2")
    assert params["proj"]["kernel"].shape == (16, 8)
    h = np.asarray(x)[0] @ np.asarray(params[sorted(names)[0]]["kernel"])
    if arch == "gpt2":
        h = np.asarray(jax.nn.gelu(h, approximate=True))
    else:
        h = np.asarray(jax.nn.silu(h)) * (np.asarray(x)[0] @ np.asarray(params["up"]["kernel"]))
    expected = h @ np.asarray(params["proj"]["kernel"])
    np.testing.assert_allclose(np.asarray(Mlp(config).apply({"params": params}, x))[0], expected, rtol=1e-4, atol=1e-5)


def test_segment_runs_bounded_to_max_runs_keep_the_rows_that_fit():
    """With max_runs R, rows of at most R runs are described exactly as with one slot per position."""
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0, 0],   # 4 runs: 3 documents + padding
                             [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])  # 1 run
    full_offsets, full_lengths = segment_runs(segment_ids)
    offsets, lengths = segment_runs(segment_ids, max_runs=4)
    assert offsets.shape == (2, 5) and lengths.shape == (2, 4)
    np.testing.assert_array_equal(offsets[:, :4], full_offsets[:, :4])
    np.testing.assert_array_equal(offsets[:, 4], [-1, -1])
    np.testing.assert_array_equal(lengths, full_lengths[:, :4])
    assert (np.asarray(full_lengths)[:, 4:] == -1).all()  # nothing beyond R was dropped


def test_cudnn_kernel_is_compiled_for_max_runs_sequences_per_row(monkeypatch):
    """The bound reaches the kernel: its sequence lengths are [B, max_runs], not [B, L] (cuDNN's
    backward memory grows with their number)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    q = jnp.zeros((2, 64, 2, 64), jnp.bfloat16)
    segment_ids = jnp.ones((2, 64), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda q: fused_attention(q, q, q, segment_ids, platform="gpu", max_runs=5))(q).jaxpr
    kernel = [eqn for eqn in _equations(jaxpr) if eqn.primitive.name == "dot_product_attention_fwd_wrapper"]
    shapes = {tuple(v.aval.shape) for v in kernel[0].invars}
    assert (2, 5) in shapes and (2, 6) in shapes and (2, 64) not in shapes
