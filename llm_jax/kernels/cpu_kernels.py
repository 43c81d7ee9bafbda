"""Fused CPU kernels called through XLA FFI: attention, float32 matmuls, norms (csrc/).

XLA:CPU leaves speed on the table in three places (docs/benchmarks.md): it has no fused attention,
so the explicit form writes and reads score-sized arrays many times per layer; its matmuls run
the step's shapes 5-40% slower than an optimised BLAS; and inside a whole step it splits each
norm into many separate passes. Here:

- `causal_attention` and `bidirectional_attention` (csrc/cpu_attention.cc, one kernel with a
  `causal` attribute: decoders and encoders) keep each (batch row, head)'s scores in cache and skip
  the masked blocks (after the diagonal, outside the block's documents), forward and backward;
- `matmul` (csrc/cpu_matmul.cc) is op(A) @ op(B) through OpenBLAS (the `scipy-openblas32` wheel),
  single-threaded per band, the bands spread over XLA's own thread pool;
- `int8_matmul` (csrc/cpu_int8_matmul.cc) multiplies a few rows by int8 weights with float32
  scales per output channel (or group of inputs) as they are stored, widening them in registers:
  a decode step reads a quarter of float32's bytes (XLA would dequantize them to float32 first);
- `layer_norm` (csrc/cpu_layer_norm.cc) is LayerNorm or RMSNorm, each row normalised in one pass,
  forward and backward.

The library is compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`/`g++`/
`clang++`; `-O3 -march=native`) against the FFI headers shipped with jaxlib, and cached in
`$LLM_JAX_CACHE_DIR` (default `~/.cache/llm_jax`) under a name that changes with the sources,
jaxlib, OpenBLAS, the compiler and the CPU, so a shared home directory never hands one machine's
build to another. The library is code this process runs, so, as ssh does for its keys, a cache
directory or library that another user owns or that others may write is refused (the directory is
created 0700). Without a compiler, if the build fails or the cache is refused, `available()` says why
once and the model keeps XLA's own ops: same functions, slower. `LLM_JAX_CPU_KERNELS=0` switches
them off.

`layers` uses them for float32 on CPU when the step runs on one device (see `layers.use_cpu_kernels`):
attention, matmuls and norms of many rows (training, a prompt's prefill), the int8 matmul for the
few rows of a decode step; GPU/TPU, sharded meshes and bf16 keep the XLA path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = ("cpu_attention.cc", "cpu_matmul.cc", "cpu_layer_norm.cc", "cpu_int8_matmul.cc")
HEADERS = ("parallel_for.h", "vector_math.h")
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_FORWARD, _BACKWARD = "llm_jax_cpu_attention_fwd", "llm_jax_cpu_attention_bwd"
_MATMUL = "llm_jax_cpu_matmul"
_INT8_MATMUL = "llm_jax_cpu_int8_matmul"
_NORM_FORWARD, _NORM_BACKWARD = "llm_jax_cpu_layer_norm_fwd", "llm_jax_cpu_layer_norm_bwd"
MATMUL_NAME = "cpu_matmul"  # checkpoint name of the kernel's outputs: `model.remat=dots` keeps them
_registered = False


def cache_dir() -> Path:
    return Path(os.environ.get("LLM_JAX_CACHE_DIR") or Path.home() / ".cache" / "llm_jax")


class UnsafeCacheError(RuntimeError):
    """The kernels' cache directory or library could be changed by someone else: it is not loaded."""


def _own_uid() -> int:
    return os.getuid()


def _check_private(path: Path, what: str) -> None:
    """Refuses `path` unless this user owns it and no one else may write it.

    Whoever can write the library (or replace it in its directory) runs code in every training
    process that loads it. Symlinks are followed: what counts is the file that would be loaded.
    """
    info = path.stat()
    if info.st_uid != _own_uid():
        raise UnsafeCacheError(f"{what} {path} is owned by uid {info.st_uid}, not by this user (uid {_own_uid()}); "
                               "use a cache directory of your own (LLM_JAX_CACHE_DIR)")
    if info.st_mode & 0o022:
        raise UnsafeCacheError(f"{what} {path} may be written by others (mode {info.st_mode & 0o777:o}); "
                               f"run 'chmod go-w {path}' or use another LLM_JAX_CACHE_DIR")


def _private_cache_dir() -> Path:
    """The cache directory, created readable by this user alone if it is new, and checked."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, mode=0o700)
        directory.chmod(0o700)  # mkdir's mode is cut by the umask; this is the mode meant
    except FileExistsError:
        pass  # made earlier or by a concurrent process: checked like any other
    _check_private(directory, "the CPU kernels' cache directory")
    return directory


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags where the OS tells them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(wanted)) or platform.processor()
    except OSError:
        return platform.machine() + platform.processor()


def _build(compiler: str) -> Path:
    """The compiled library, built once per (sources, jaxlib, OpenBLAS, compiler, CPU) and reused."""
    import jaxlib
    import scipy_openblas32

    blas_lib = scipy_openblas32.get_lib_dir()
    flags = [*CXX_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{scipy_openblas32.get_include_dir()}",
             f"-I{SOURCE_DIR}"]
    links = [f"-L{blas_lib}", f"-l{scipy_openblas32.get_library()}", f"-Wl,-rpath,{blas_lib}"]
    key = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        key.update((SOURCE_DIR / name).read_bytes())
    for part in (jaxlib.__version__, scipy_openblas32.get_openblas_config(), compiler, " ".join(flags + links),
                 _cpu_signature()):
        key.update(part.encode())
    target = _private_cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        _check_private(target, "the CPU kernels' library")
        return target
    # Build beside the target and rename: a concurrent process never loads a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        command = [compiler, *flags, *(str(SOURCE_DIR / name) for name in SOURCES), "-o", str(partial), *links]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line]
            raise RuntimeError((errors or result.stderr.splitlines() or ["no output"])[0].strip())
        partial.chmod(0o755)  # whatever the umask, no one else may write it (checked when it is reused)
        os.replace(partial, target)
    return target


@functools.cache
def available() -> bool:
    """True once the kernels are built, loaded and registered with XLA; False (logged once) otherwise."""
    if os.environ.get("LLM_JAX_CPU_KERNELS", "1") == "0":
        return False
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler found: CPU training uses XLA's own (slower) attention, matmuls and norms")
        return False
    global _registered
    try:
        if not _registered:  # XLA keeps a target for the process's lifetime: register once
            library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
            for name, symbol in ((_FORWARD, library.LlmJaxCpuAttentionForward),
                                 (_BACKWARD, library.LlmJaxCpuAttentionBackward),
                                 (_MATMUL, library.LlmJaxCpuMatmul),
                                 (_INT8_MATMUL, library.LlmJaxCpuInt8Matmul),
                                 (_NORM_FORWARD, library.LlmJaxCpuLayerNormForward),
                                 (_NORM_BACKWARD, library.LlmJaxCpuLayerNormBackward)):
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
            # One BLAS thread per call: the kernel spreads its bands over XLA's thread pool instead.
            library.scipy_openblas_set_num_threads(1)
            _registered = True
    except UnsafeCacheError as error:
        log.warning("not loading the fused CPU kernels: %s. CPU training uses XLA's own (slower) attention, "
                    "matmuls and norms", error)
        return False
    except (ImportError, OSError, RuntimeError, AttributeError) as error:
        log.warning("the fused CPU kernels could not be built (%s): CPU training uses XLA's own (slower) "
                    "attention, matmuls and norms", error)
        return False
    return True


# ----------------------------------------------------------------------------- attention


def _forward_call(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal: bool):
    batch, length, n_heads, _ = q_BLHD.shape
    out_types = (jax.ShapeDtypeStruct(q_BLHD.shape, jnp.float32),
                 jax.ShapeDtypeStruct((batch, n_heads, length), jnp.float32))
    return jax.ffi.ffi_call(_FORWARD, out_types)(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal=causal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal: bool):
    return _forward_call(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal)[0]


def _attention_fwd(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal):
    out_BLHD, lse_BHL = _forward_call(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal)
    return out_BLHD, (q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, out_BLHD, lse_BHL)


def _attention_bwd(causal, residuals, dout_BLHD):
    q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, out_BLHD, lse_BHL = residuals
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q_BLHD, k_BLKD, v_BLKD))
    dq, dk, dv = jax.ffi.ffi_call(_BACKWARD, out_types)(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, out_BLHD,
                                                         lse_BHL, dout_BLHD, causal=causal)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _fused_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal: bool) -> jax.Array:
    if segment_ids_BL is None:
        segment_ids_BL = jnp.zeros(q_BLHD.shape[:2], jnp.int32)
    return _attention(q_BLHD.astype(jnp.float32), k_BLKD.astype(jnp.float32), v_BLKD.astype(jnp.float32),
                      segment_ids_BL.astype(jnp.int32), causal)


def causal_attention(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array,
                     segment_ids_BL: jax.Array | None) -> jax.Array:
    """Causal grouped-query attention within documents, float32, on CPU; [B, L, H, D].

    The same function as `layers.xla_attention` with `layers.causal_segment_mask(segment_ids_BL)`.
    Call only when `available()`; `layers.use_cpu_kernels` decides.
    """
    return _fused_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal=True)


def bidirectional_attention(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array,
                            segment_ids_BL: jax.Array | None) -> jax.Array:
    """Grouped-query attention of every token to every token of its document (an encoder's), float32,
    on CPU; [B, L, H, D].

    The same function as `layers.xla_attention` with mask[b, 0, i, j] = (segment_ids_BL[b, i] ==
    segment_ids_BL[b, j]) (no segment ids: one document per row; padding, segment 0, sees only
    padding). Packed documents are runs of equal ids, so a query block of a short document skips
    the keys of the others. Call only when `available()`; `layers.use_cpu_kernels` decides.
    """
    return _fused_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal=False)


# ----------------------------------------------------------------------------- matmul


def _matmul_call(a, b, transpose_a: bool, transpose_b: bool):
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    out_type = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return jax.ffi.ffi_call(_MATMUL, out_type)(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(a_MK, b, transpose_b: bool):
    return _matmul_call(a_MK, b, False, transpose_b)


def _matmul_fwd(a_MK, b, transpose_b):
    return _matmul_call(a_MK, b, False, transpose_b), (a_MK, b)


def _matmul_bwd(transpose_b, residuals, dc_MN):
    a_MK, b = residuals
    if transpose_b:  # c = a @ b.T with b [N, K]
        return _matmul_call(dc_MN, b, False, False), _matmul_call(dc_MN, a_MK, True, False)
    return _matmul_call(dc_MN, b, False, True), _matmul_call(a_MK, dc_MN, True, False)  # b [K, N]


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(a_MK: jax.Array, b: jax.Array, transpose_b: bool = False) -> jax.Array:
    """a [M, K] @ b [K, N] (or @ b.T for b [N, K] with `transpose_b`), float32, with gradients.

    Call only when `available()`; `layers.use_cpu_kernels` decides.
    """
    return _matmul(a_MK.astype(jnp.float32), b.astype(jnp.float32), transpose_b)


def int8_matmul(a_MK: jax.Array, qvalue: jax.Array, scale: jax.Array, transpose_b: bool = False) -> jax.Array:
    """a [M, K] @ dequantized int8 weights, float32 [M, N]; no gradient (quantized weights are not trained).

    qvalue [K, N] int8 with scale [K / G, N] float32 (one per output column and group of G
    consecutive inputs; G = K: per column), or with `transpose_b` qvalue [N, K] and scale [N, K / G]:
    the function `a @ (qvalue * repeat(scale, G))` (or its transpose). Call only when `available()`;
    `layers.use_cpu_int8_matmul` decides.
    """
    n = qvalue.shape[0] if transpose_b else qvalue.shape[1]
    out_type = jax.ShapeDtypeStruct((a_MK.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(_INT8_MATMUL, out_type)(a_MK.astype(jnp.float32), qvalue.astype(jnp.int8),
                                                    scale.astype(jnp.float32), transpose_b=transpose_b)


def int8_layout(weight, n_in: int, contracted_last: bool = False) -> tuple[int, ...] | None:
    """For a qwix QArray whose first `n_in` axes (or last, `contracted_last`) are contracted: its
    scales' shape broadcast so that each is shared by a run of consecutive inputs of the flattened
    contracted axes (a group), or None when the layout is not one `int8_matmul` takes (a zero point,
    a tile along another contracted axis, a dtype other than int8)."""
    if weight.qtype != jnp.int8 or getattr(weight, "zero_point", None) is not None or weight.qvalue.dtype != jnp.int8:
        return None
    q_shape, s_shape = weight.qvalue.shape, weight.scale.shape
    if len(s_shape) != len(q_shape):
        return None
    contracted = range(len(q_shape) - n_in, len(q_shape)) if contracted_last else range(n_in)
    last = contracted[-1]
    target = list(q_shape)
    target[last] = s_shape[last]
    if q_shape[last] % s_shape[last] or any(s not in (1, t) for s, t in zip(s_shape, target)):
        return None
    return tuple(target)


def int8_operands(weight, n_in: int, *, contracted_last: bool = False) -> tuple[jax.Array, jax.Array]:
    """The 2-D operands of `int8_matmul` from a qwix QArray (`int8_layout` not None): (int8 values,
    float32 scales), [K, N] and [K / G, N] for a kernel whose first `n_in` axes are contracted, or
    [N, K] and [N, K / G] with `contracted_last` (an embedding table used as the output projection).
    A scale shared along a contracted axis other than the last (qwix keeps one there) is repeated, so
    that every group is G consecutive inputs of the flattened axis; the repeat is small and
    loop-invariant."""
    scale = jnp.broadcast_to(weight.scale, int8_layout(weight, n_in, contracted_last))
    q_shape = weight.qvalue.shape
    split = len(q_shape) - n_in if contracted_last else n_in
    lead, tail = math.prod(q_shape[:split]), math.prod(q_shape[split:])
    if contracted_last:
        return weight.qvalue.reshape(lead, tail), scale.reshape(lead, -1)
    return weight.qvalue.reshape(lead, tail), scale.reshape(-1, tail)


# ----------------------------------------------------------------------------- norms


def _norm_forward_call(x, scale, bias, eps: float, rms: bool):
    stats = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
    out_types = (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats)
    return jax.ffi.ffi_call(_NORM_FORWARD, out_types)(x, scale, bias, eps=np.float32(eps), rms=rms)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, eps: float, rms: bool):
    return _norm_forward_call(x, scale, bias, eps, rms)[0]


def _layer_norm_fwd(x, scale, bias, eps, rms):
    y, mean, rstd = _norm_forward_call(x, scale, bias, eps, rms)
    return y, (x, scale, mean, rstd)


def _layer_norm_bwd(eps, rms, residuals, dy):
    x, scale, mean, rstd = residuals
    out_types = (jax.ShapeDtypeStruct(x.shape, jnp.float32), *[jax.ShapeDtypeStruct(scale.shape, jnp.float32)] * 2)
    dx, dscale, dbias = jax.ffi.ffi_call(_NORM_BACKWARD, out_types)(x, scale, mean, rstd, dy, rms=rms)
    return dx, dscale, dbias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x: jax.Array, scale_E: jax.Array, bias_E: jax.Array | None, eps: float) -> jax.Array:
    """LayerNorm over the last axis of x, float32, with gradients; RMSNorm when `bias_E` is None.

    The same function as `layers.Norm`'s XLA form. Call only when `available()`;
    `layers.use_cpu_kernels` decides.
    """
    rms = bias_E is None
    bias_E = jnp.zeros_like(scale_E) if rms else bias_E
    return _layer_norm(x.astype(jnp.float32), scale_E.astype(jnp.float32), bias_E.astype(jnp.float32), eps, rms)
