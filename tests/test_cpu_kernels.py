"""The CPU kernels (fused attention, BLAS and int8 matmuls, norms) against XLA's ops; when the model uses them;
the fallback."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from llm_jax.config import ModelConfig
from llm_jax.kernels import cpu_kernels
from llm_jax.models import layers
from llm_jax.models.layers import causal_segment_mask, xla_attention

# The CI machine has a C++ compiler: there the kernels must build, so their tests never skip silently.
needs_kernel = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                  reason="no C++ compiler on this machine")


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _value_and_grads(attention, q, k, v, cotangent):
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v) * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@needs_kernel
def test_kernels_build_on_a_machine_with_a_compiler():
    assert cpu_kernels.available()


@needs_kernel
@pytest.mark.parametrize("length, heads, kv_heads, head_dim, segments", [
    (10, 4, 2, 8, [[1, 1, 1, 1, 1, 2, 2, 2, 2, 0], [1] * 10]),  # GQA; documents and padding
    (100, 2, 2, 24, None),  # query blocks of 64 with a ragged last one; D not a multiple of the vector width
    (130, 6, 3, 64, "random"),  # many documents per row, rows longer than two blocks
])
def test_kernel_matches_explicit_attention_and_its_gradients(length, heads, kv_heads, head_dim, segments):
    batch = 2
    if segments == "random":
        segments = np.sort(np.random.default_rng(0).integers(0, 5, (batch, length)), axis=1).tolist()
    segment_ids = None if segments is None else jnp.array(segments, jnp.int32)
    _assert_kernel_matches_explicit(cpu_kernels.causal_attention, causal_segment_mask(segment_ids, length),
                                    segment_ids, (batch, length, heads, kv_heads, head_dim))


def _assert_kernel_matches_explicit(kernel, mask, segment_ids, shape):
    """`kernel(q, k, v, segment_ids)` and its gradients against `xla_attention` under `mask`."""
    batch, length, heads, kv_heads, head_dim = shape
    q = _normal(1, (batch, length, heads, head_dim))
    k = _normal(2, (batch, length, kv_heads, head_dim))
    v = _normal(3, (batch, length, kv_heads, head_dim))
    cotangent = _normal(4, (batch, length, heads, head_dim))
    value, grads = _value_and_grads(lambda q, k, v: kernel(q, k, v, segment_ids), q, k, v, cotangent)
    expected_value, expected_grads = _value_and_grads(lambda q, k, v: xla_attention(q, k, v, mask), q, k, v,
                                                      cotangent)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for got, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=2e-5)


def _document_mask(segment_ids, length):
    """The encoder's mask, written out here: query i sees key j iff both lie in the same document."""
    if segment_ids is None:
        return jnp.ones((1, 1, length, length), bool)
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def _packed_rows(seed, batch, length, n_docs):
    """Rows of contiguous documents 1..n_docs followed by padding (segment 0), cut at random places."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), n_docs, replace=False))
        row = np.searchsorted(cuts, np.arange(length), side="right") + 1
        rows.append(np.where(row > n_docs, 0, row))
    return rows


@needs_kernel
@pytest.mark.parametrize("length, heads, kv_heads, head_dim, segments", [
    (10, 4, 2, 8, [[1, 1, 1, 1, 1, 2, 2, 2, 2, 0], [1] * 10]),  # GQA; documents and padding
    (100, 2, 2, 24, None),  # one document per row; a ragged last query block of 36
    (130, 6, 3, 64, "packed"),  # several documents and padding, blocks that start inside a document
    (150, 4, 1, 16, "scattered"),  # ids that are not runs: every block sees keys all over the row
])
def test_bidirectional_kernel_matches_explicit_attention_and_its_gradients(length, heads, kv_heads, head_dim,
                                                                          segments):
    batch = 2
    if segments == "packed":
        segments = _packed_rows(0, batch, length, n_docs=4)
    elif segments == "scattered":
        segments = np.random.default_rng(0).integers(0, 3, (batch, length)).tolist()
    segment_ids = None if segments is None else jnp.array(segments, jnp.int32)
    _assert_kernel_matches_explicit(cpu_kernels.bidirectional_attention, _document_mask(segment_ids, length),
                                    segment_ids, (batch, length, heads, kv_heads, head_dim))


@needs_kernel
def test_bidirectional_kernel_sees_later_keys_of_its_document_only():
    """The first token's output moves with the last key of its document, never with another document's."""
    segment_ids = jnp.array([[1] * 70 + [2] * 60], jnp.int32)  # the first document crosses a query block
    q, k, v = (_normal(seed, (1, 130, 2, 16)) for seed in (1, 2, 3))
    attention = jax.jit(cpu_kernels.bidirectional_attention)
    out = np.asarray(attention(q, k, v, segment_ids))
    later_in_document = np.asarray(attention(q, k, v.at[0, 69].add(1.0), segment_ids))
    other_document = np.asarray(attention(q, k, v.at[0, 129].add(1.0), segment_ids))
    assert np.abs(later_in_document[0, 0] - out[0, 0]).max() > 1e-3  # a causal mask would hide key 69 from query 0
    np.testing.assert_array_equal(other_document[0, :70], out[0, :70])
    causal = np.asarray(jax.jit(cpu_kernels.causal_attention)(q, k, v, segment_ids))
    np.testing.assert_allclose(out[0, 69], causal[0, 69], rtol=1e-5, atol=1e-6)  # the last row sees the same keys


@needs_kernel
def test_nan_input_gives_nan_output():
    q = _normal(1, (1, 8, 2, 16)).at[0, 3, 0, 0].set(jnp.nan)
    k, v = _normal(2, (1, 8, 2, 16)), _normal(3, (1, 8, 2, 16))
    out = np.asarray(jax.jit(cpu_kernels.causal_attention)(q, k, v, None))
    assert np.isnan(out[0, 3, 0]).all()  # the NaN query row, so the non-finite guard sees it
    assert np.isfinite(out[0, :3]).all()


def _attention_hlo(dtype: str, arch: str = "gpt2") -> str:
    config = ModelConfig(arch=arch, vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=16,
                         dtype=dtype)
    module = layers.Attention(config)
    x = jnp.ones((4, 16, 32), layers.to_dtype(dtype))  # 64 rows: layers.CPU_KERNEL_MIN_ROWS
    positions = jnp.broadcast_to(jnp.arange(16), (4, 16))
    params = module.init(jax.random.key(0), x, positions, None, False)
    return jax.jit(lambda p: module.apply(p, x, positions, None, False)).lower(params).as_text()


@needs_kernel
def test_model_uses_the_kernels_for_float32_on_one_cpu_device_only():
    hlo = _attention_hlo("float32")
    assert "llm_jax_cpu_attention_fwd" in hlo and "llm_jax_cpu_matmul" in hlo
    hlo = _attention_hlo("bfloat16")
    assert "llm_jax_cpu_attention_fwd" not in hlo and "llm_jax_cpu_matmul" not in hlo
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        assert "llm_jax_cpu_attention_fwd" in _attention_hlo("float32")


@needs_kernel
def test_an_encoder_uses_the_bidirectional_kernel_and_a_decoder_the_causal_one():
    encoder_hlo, decoder_hlo = _attention_hlo("float32", arch="bert"), _attention_hlo("float32")
    assert "llm_jax_cpu_attention_fwd" in encoder_hlo and "causal = false" in encoder_hlo
    assert "causal = true" not in encoder_hlo
    assert "llm_jax_cpu_attention_fwd" in decoder_hlo and "causal = true" in decoder_hlo


@needs_kernel
def test_a_failed_build_is_one_line(monkeypatch, tmp_path):
    for name in (*cpu_kernels.SOURCES, *cpu_kernels.HEADERS):
        (tmp_path / name).write_text((cpu_kernels.SOURCE_DIR / name).read_text())
    (tmp_path / cpu_kernels.SOURCES[-1]).write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE_DIR", tmp_path)
    monkeypatch.setenv("LLM_JAX_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError) as error:
        cpu_kernels._build(cpu_kernels._compiler())
    assert "\n" not in str(error.value) and "error" in str(error.value)
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left to load


def test_without_a_compiler_the_model_falls_back_to_xla_attention(tmp_path):
    """A machine without a C++ compiler: one warning, and attention and matmuls stay XLA's."""
    code = (
        "import jax.numpy as jnp, jax\n"
        "from llm_jax.kernels import cpu_kernels\n"
        "from llm_jax.models import layers\n"
        "from llm_jax.config import ModelConfig\n"
        "config = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=16)\n"
        "m = layers.Attention(config); x = jnp.ones((1, 16, 32)); pos = jnp.arange(16)[None]\n"
        "p = m.init(jax.random.key(0), x, pos, None, False)\n"
        "hlo = jax.jit(lambda p: m.apply(p, x, pos, None, False)).lower(p).as_text()\n"
        "assert not cpu_kernels.available() and 'llm_jax_cpu' not in hlo\n"
        "print('fell back')\n"
    )
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "CXX": "", "LLM_JAX_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fell back" in result.stdout
    assert result.stderr.count("no C++ compiler found") == 1


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("LLM_JAX_CPU_KERNELS", "0")
    cpu_kernels.available.cache_clear()
    try:
        assert not cpu_kernels.available()
        hlo = _attention_hlo("float32")
        assert "llm_jax_cpu_attention_fwd" not in hlo and "llm_jax_cpu_matmul" not in hlo
    finally:
        cpu_kernels.available.cache_clear()


@needs_kernel
@pytest.mark.parametrize("m, k, n, transpose_b", [(64, 48, 80, False), (130, 24, 7, True), (5, 300, 200, False),
                                                  (1, 16, 1, True)])
def test_matmul_matches_xla_and_its_gradients(m, k, n, transpose_b):
    a = _normal(1, (m, k))
    b = _normal(2, (n, k) if transpose_b else (k, n))
    cotangent = _normal(3, (m, n))

    def loss(matmul):
        return jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(matmul(a, b) * cotangent), argnums=(0, 1)))(a, b)

    value, grads = loss(lambda a, b: cpu_kernels.matmul(a, b, transpose_b))
    expected_value, expected_grads = loss(lambda a, b: a @ (b.T if transpose_b else b))
    np.testing.assert_allclose(value, expected_value, rtol=1e-4)
    for got, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("shape, n_in, group_size, rows", [
    ((48, 3, 16), 1, None, 1),  # a query projection: embed -> heads x head_dim, per output channel
    ((3, 16, 48), 2, 8, 5),     # the attention output: two contracted axes, groups along head_dim
    ((20, 70), 1, 5, 17),       # ragged: columns not a whole vector, rows not a whole tile
])
def test_int8_matmul_matches_the_dequantized_matmul(shape, n_in, group_size, rows):
    from llm_jax.infer import quantize

    assert cpu_kernels.available()
    weight = quantize.quantize_weight(_normal(1, shape), tuple(range(n_in)), group_size)
    x = _normal(2, (rows, *shape[:n_in]))
    qvalue_KN, scale_GN = cpu_kernels.int8_operands(weight, n_in)
    got = cpu_kernels.int8_matmul(x.reshape(rows, -1), qvalue_KN, scale_GN)
    dequantized = np.asarray(qwix.dequantize(weight), np.float64).reshape(qvalue_KN.shape)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x, np.float64).reshape(rows, -1) @ dequantized,
                               rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("group_size, rows", [(None, 1), (8, 3)])
def test_int8_matmul_against_an_embedding_table(group_size, rows):
    """The tied output projection: logits = x @ table.T, one scale per row of the table (a token)."""
    from llm_jax.infer import quantize

    assert cpu_kernels.available()
    table = quantize.quantize_weight(_normal(1, (300, 40)), (1,), group_size)
    x = _normal(2, (rows, 40))
    qvalue_VE, scale_VG = cpu_kernels.int8_operands(table, 1, contracted_last=True)
    got = cpu_kernels.int8_matmul(x, qvalue_VE, scale_VG, transpose_b=True)
    expected = np.asarray(x, np.float64) @ np.asarray(qwix.dequantize(table), np.float64).T
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_int8_matmul_rejects_shapes_that_do_not_fit():
    assert cpu_kernels.available()
    with pytest.raises(Exception, match="cpu int8 matmul"):
        jax.block_until_ready(cpu_kernels.int8_matmul(jnp.ones((1, 8)), jnp.ones((7, 4), jnp.int8),
                                                      jnp.ones((1, 4))))


@needs_kernel
def test_dense_layer_with_the_kernel_equals_xla(monkeypatch):
    """A 2-in-dim projection (heads x head_dim -> embed) and its gradients, kernel on and off."""
    monkeypatch.setattr(layers, "CPU_KERNEL_MIN_ROWS", 1)  # 10 rows: a decode step's size keeps XLA's dot
    dense = layers.Dense(features=(6,), kernel_axes=("heads", "head_dim", "embed"), n_in=2, use_bias=True)
    x = _normal(4, (2, 5, 3, 4))
    params = dense.init(jax.random.key(0), x)

    def value_and_grads():
        return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(dense.apply(p, x))), argnums=(0, 1)))(params, x)

    with_kernel = value_and_grads()
    assert "llm_jax_cpu_matmul" in jax.jit(dense.apply).lower(params, x).as_text()
    monkeypatch.setattr(layers, "use_cpu_matmul", lambda dtype, out_dtype=None, rows=None: False)
    without = value_and_grads()
    for got, expected in zip(jax.tree.leaves(with_kernel), jax.tree.leaves(without)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", [(2, 70, 37), (3, 384), (1, 1, 16)])  # ragged rows and tasks; one row
def test_norm_kernel_matches_xla_and_its_gradients(monkeypatch, rms, shape):
    monkeypatch.setattr(layers, "CPU_KERNEL_MIN_ROWS", 1)
    norm = layers.Norm(rms=rms, eps=1e-5)
    x = _normal(1, shape) * 3.0 + 1.0
    params = jax.tree.map(lambda p: p + _normal(2, p.shape), norm.init(jax.random.key(0), x))
    cotangent = _normal(3, shape)

    def value_and_grads():
        loss = jax.value_and_grad(lambda p, x: jnp.sum(norm.apply(p, x) * cotangent), argnums=(0, 1))
        return jax.jit(lambda p, x: (norm.apply(p, x), loss(p, x)))(params, x)

    with_kernel = value_and_grads()
    hlo = jax.jit(jax.grad(lambda p, x: jnp.sum(norm.apply(p, x)))).lower(params, x).as_text()
    assert "llm_jax_cpu_layer_norm_fwd" in hlo and "llm_jax_cpu_layer_norm_bwd" in hlo
    monkeypatch.setattr(layers, "use_cpu_kernels", lambda dtype: False)
    without = value_and_grads()
    assert jax.tree.structure(with_kernel) == jax.tree.structure(without)
    for got, expected in zip(jax.tree.leaves(with_kernel), jax.tree.leaves(without)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-5, atol=2e-5)


@needs_kernel
def test_norm_kernel_gradients_do_not_depend_on_the_thread_count():
    """Parameter gradients are sums over rows: fixed chunks, added in order, whatever the threads."""
    x, dy = _normal(1, (1000, 24)), _normal(2, (1000, 24))
    scale, bias = _normal(3, (24,)), _normal(4, (24,))
    grads = jax.jit(jax.grad(lambda s, b: jnp.sum(cpu_kernels.layer_norm(x, s, b, 1e-5) * dy), argnums=(0, 1)))
    first = grads(scale, bias)
    for _ in range(5):
        for a, b in zip(first, grads(scale, bias)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_kernel
def test_norm_kernel_rejects_mismatched_shapes():
    with pytest.raises(Exception, match="cpu layer norm"):
        jax.block_until_ready(cpu_kernels.layer_norm(jnp.ones((4, 8)), jnp.ones(7), jnp.ones(7), 1e-5))


# ----------------------------------------------------------------------------- where the library may come from


@pytest.fixture
def compiler_stand_in(monkeypatch):
    """Replaces the compiler run: records the library each build would write, writes nothing, fails."""
    outputs = []

    def run(command, **_):
        outputs.append(Path(command[command.index("-o") + 1]).name)
        return subprocess.CompletedProcess(command, 1, "", "error: stopped by the test")

    monkeypatch.setattr(cpu_kernels.subprocess, "run", run)
    return outputs


def test_a_new_cache_directory_is_private(monkeypatch, tmp_path, compiler_stand_in):
    cache = tmp_path / "new" / "cache"
    monkeypatch.setenv("LLM_JAX_CACHE_DIR", str(cache))
    with pytest.raises(RuntimeError, match="stopped by the test"):
        cpu_kernels._build("c++")
    assert (cache.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_cache_directory_others_may_write_is_refused(monkeypatch, tmp_path, compiler_stand_in, mode):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    monkeypatch.setenv("LLM_JAX_CACHE_DIR", str(cache))
    with pytest.raises(RuntimeError) as error:
        cpu_kernels._build("c++")
    assert str(cache) in str(error.value) and "written by others" in str(error.value)
    assert "\n" not in str(error.value) and not compiler_stand_in  # refused before any build


def test_a_cache_directory_of_another_user_is_refused(monkeypatch, tmp_path, compiler_stand_in):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    # As if someone else ran the process: the directory's owner is then another user.
    monkeypatch.setattr(cpu_kernels, "_own_uid", lambda: cache.stat().st_uid + 1, raising=False)
    monkeypatch.setenv("LLM_JAX_CACHE_DIR", str(cache))
    with pytest.raises(RuntimeError, match="owned by uid"):
        cpu_kernels._build("c++")


def test_a_library_others_may_write_is_not_loaded(monkeypatch, tmp_path, compiler_stand_in, caplog):
    """A planted (or group-writable) library in a private directory is refused before it is loaded."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("LLM_JAX_CACHE_DIR", str(cache))
    with pytest.raises(RuntimeError, match="stopped by the test"):
        cpu_kernels._build("c++")
    library = cache / compiler_stand_in[0]
    library.write_bytes(b"not a library")
    library.chmod(0o666)
    loaded = []
    monkeypatch.setattr(cpu_kernels.ctypes.cdll, "LoadLibrary", loaded.append)
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "c++")
    monkeypatch.setattr(cpu_kernels, "_registered", False)
    cpu_kernels.available.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert not cpu_kernels.available()
    finally:
        cpu_kernels.available.cache_clear()
    assert not loaded
    assert f"not loading the fused CPU kernels: the CPU kernels' library {library} may be written by others" \
        in caplog.text
