"""glibc malloc tuning for XLA:CPU: freed blocks are reused without fresh page faults; only on the CPU."""

import os
import platform
import subprocess
import sys

import pytest

from llm_jax.kernels import host_memory

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# As XLA:CPU does with a step's temporaries: a worker thread mallocs a 256 MB block, fills it and
# frees it, twice. Prints whether the tuning was made, then the page faults of the second time.
_SECOND_ALLOCATION_FAULTS = """
import ctypes, resource, threading
from llm_jax.kernels import host_memory
print(host_memory.tune_malloc_for_xla_cpu())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 256 * 2**20, []

def step():
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

worker = threading.Thread(target=lambda: [step() for _ in range(2)])
worker.start()
worker.join()
print(faults[1])
"""


def _second_allocation(**env) -> tuple[bool, int]:
    result = subprocess.run([sys.executable, "-c", _SECOND_ALLOCATION_FAULTS], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    tuned, faults = result.stdout.split()
    return tuned == "True", int(faults)


@glibc_only
def test_a_freed_block_is_reused_without_page_faults():
    tuned, tuned_faults = _second_allocation(JAX_PLATFORMS="cpu")
    assert tuned and tuned_faults < 1000  # the 65,536 pages were mapped by the first allocation
    untuned, untuned_faults = _second_allocation(JAX_PLATFORMS="cpu", LLM_JAX_MALLOC_TUNING="0")
    # glibc's default maps the block afresh and faults every page in again (every 4 KiB page, or
    # every 2 MiB one where transparent huge pages are always on).
    assert not untuned and untuned_faults > 10 * max(tuned_faults, 10)


def test_left_alone_when_the_run_is_not_on_the_cpu():
    import jax

    before = jax.config.jax_platforms
    try:
        jax.config.update("jax_platforms", "cuda,cpu")
        assert not host_memory.runs_on_cpu() and not host_memory.tune_malloc_for_xla_cpu()
        jax.config.update("jax_platforms", "cpu")
        assert host_memory.runs_on_cpu()
    finally:
        jax.config.update("jax_platforms", before)


def test_an_accelerator_needs_both_its_device_files_and_a_plugin(monkeypatch):
    monkeypatch.setattr(host_memory, "accelerator_plugin_installed", lambda: True)  # e.g. jax[tpu] to plan pods
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: [])
    assert not host_memory.accelerator_present()
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    assert host_memory.accelerator_present()
    monkeypatch.setattr(host_memory, "accelerator_plugin_installed", lambda: False)
    assert not host_memory.accelerator_present()
