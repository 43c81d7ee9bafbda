"""Fused causal attention for XLA:CPU: a C++ kernel (csrc/cpu_attention.cc) called through XLA FFI.

XLA:CPU has no fused attention: the explicit form writes and reads score-sized arrays many times
per layer and costs about twice a fused kernel (docs/benchmarks.md). The kernel here keeps each
(batch row, head)'s scores in cache and skips the masked blocks, forward and backward.

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`/`g++`;
`-O3 -march=native`) against the FFI headers shipped with jaxlib, and cached in
`$LLM_JAX_CACHE_DIR` (default `~/.cache/llm_jax`) under a name that changes with the source,
jaxlib, the compiler and the CPU, so a shared home directory never hands one machine's build to
another. Without a compiler, or if the build fails, `available()` says why once and training uses
the blocked XLA attention (blocked_attention.py): same function, slower.

`layers.Attention` uses it for `model.attention=xla` training on CPU in float32 when the step runs
on one device; everything else (GPU/TPU, sharded meshes, bf16, decoding) keeps the XLA path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cc"
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_FORWARD, _BACKWARD = "llm_jax_cpu_attention_fwd", "llm_jax_cpu_attention_bwd"
_registered = False


def cache_dir() -> Path:
    return Path(os.environ.get("LLM_JAX_CACHE_DIR") or Path.home() / ".cache" / "llm_jax")


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
    """The compiled library, built once per (source, jaxlib, compiler, CPU) and reused."""
    import jaxlib

    include = jax.ffi.include_dir()
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), compiler.encode(), " ".join(CXX_FLAGS).encode(),
                 _cpu_signature().encode()):
        key.update(part)
    target = cache_dir() / f"cpu_attention-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent process never loads a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        command = [compiler, *CXX_FLAGS, f"-I{include}", str(SOURCE), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line]
            raise RuntimeError((errors or result.stderr.splitlines() or ["no output"])[0].strip())
        os.replace(partial, target)
    return target


@functools.cache
def available() -> bool:
    """True once the kernel is built, loaded and registered with XLA; False (logged once) otherwise."""
    if os.environ.get("LLM_JAX_CPU_ATTENTION", "1") == "0":
        return False
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler found: CPU training uses the (slower) XLA attention")
        return False
    global _registered
    try:
        if not _registered:  # XLA keeps a target for the process's lifetime: register once
            library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
            for name, symbol in ((_FORWARD, library.LlmJaxCpuAttentionForward),
                                 (_BACKWARD, library.LlmJaxCpuAttentionBackward)):
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
            _registered = True
    except (OSError, RuntimeError, AttributeError) as error:
        log.warning("the fused CPU attention kernel could not be built (%s): CPU training uses the (slower) "
                    "XLA attention", error)
        return False
    return True


def _forward_call(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL):
    batch, length, n_heads, _ = q_BLHD.shape
    out_types = (jax.ShapeDtypeStruct(q_BLHD.shape, jnp.float32),
                 jax.ShapeDtypeStruct((batch, n_heads, length), jnp.float32))
    return jax.ffi.ffi_call(_FORWARD, out_types)(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)


@jax.custom_vjp
def _attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL):
    return _forward_call(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)[0]


def _attention_fwd(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL):
    out_BLHD, lse_BHL = _forward_call(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
    return out_BLHD, (q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, out_BLHD, lse_BHL)


def _attention_bwd(residuals, dout_BLHD):
    q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, out_BLHD, lse_BHL = residuals
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q_BLHD, k_BLKD, v_BLKD))
    dq, dk, dv = jax.ffi.ffi_call(_BACKWARD, out_types)(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, out_BLHD,
                                                         lse_BHL, dout_BLHD)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array,
                     segment_ids_BL: jax.Array | None) -> jax.Array:
    """Causal grouped-query attention within documents, float32, on CPU; [B, L, H, D].

    The same function as `layers.xla_attention` with `layers.causal_segment_mask(segment_ids_BL)`.
    Call only when `available()`; `layers.Attention` decides.
    """
    if segment_ids_BL is None:
        segment_ids_BL = jnp.zeros(q_BLHD.shape[:2], jnp.int32)
    return _attention(q_BLHD.astype(jnp.float32), k_BLKD.astype(jnp.float32), v_BLKD.astype(jnp.float32),
                      segment_ids_BL.astype(jnp.int32))
