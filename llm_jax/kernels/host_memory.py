"""Host memory for XLA:CPU: reuse freed memory instead of mapping fresh pages at every step.

XLA:CPU allocates each step's temporaries as one block (~1 GB for the baby GPT), from one of its
worker threads, and frees it at the end of the step. glibc serves a block that large with a fresh
`mmap` and returns it with `munmap`, so every step page-faults the whole block in again: ~260,000
faults and ~0.45 s of kernel time per baby-GPT step, ~10% of the step's wall time
(docs/benchmarks.md). With one malloc arena, no `mmap` for big blocks and no trimming, the block is
reused from the heap, already mapped.

The settings must be made before XLA's worker threads first allocate (each thread keeps the arena
it started with), i.e. before JAX starts its CPU client: the command line does it first thing.
They are made only where the run will be on the CPU: with a GPU or TPU the temporaries live in
device memory and the host's allocator is left as it is. `LLM_JAX_MALLOC_TUNING=0` switches this off.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes: up to 2 GiB freed at the heap's top stays mapped


def accelerator_plugin_installed() -> bool:
    """Whether JAX would find a GPU or TPU plugin (its discovery: libtpu, the jax_plugins package and entry points)."""
    if importlib.util.find_spec("libtpu") is not None or importlib.metadata.entry_points(group="jax_plugins"):
        return True
    try:
        import jax_plugins
    except ImportError:
        return False
    return any(pkgutil.iter_modules(jax_plugins.__path__))


def accelerator_present() -> bool:
    """Whether this host has a GPU or TPU (its device files: NVIDIA, AMD, TPU) and JAX a plugin for
    it. A plugin alone is not enough: `jax[tpu]` is also installed on CPU hosts to plan pods."""
    device_files = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
    return any(glob.glob(pattern) for pattern in device_files) and accelerator_plugin_installed()


def runs_on_cpu() -> bool:
    """Whether JAX will pick the CPU, told without starting any backend."""
    import jax

    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not accelerator_present()


def tune_malloc_for_xla_cpu() -> bool:
    """Make glibc keep and reuse freed memory, for a process that is about to train on the CPU.

    Returns whether the settings were made. Call before the first JAX computation; later calls
    are harmless but do not reach the threads XLA has already started.
    """
    if os.environ.get("LLM_JAX_MALLOC_TUNING", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    if not runs_on_cpu():
        return False
    libc = ctypes.CDLL(None)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    done = all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in settings)
    if not done:
        log.warning("could not tune malloc for XLA:CPU: each step maps its temporary memory afresh")
    return done
