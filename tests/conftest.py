"""Shared test setup: CPU, strict rank promotion, tiny configs, one compilation cache per session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Most of the suite's time is XLA compiling the same few tiny programs again: every test builds its
# own jitted steps, and every `llm-jax` subprocess (CLI runs, multi-process jobs, fake-device scripts)
# starts with an empty in-memory cache. JAX's persistent cache, keyed by the program, the compile
# options, the XLA flags and the devices, lets each distinct program compile once per session and
# be loaded after that, in this process and in every child (they inherit the environment). The
# directory is fresh for each session, so a run never loads what an older version of the code built;
# set JAX_COMPILATION_CACHE_DIR to keep one across sessions on purpose.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="llm_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny programs compile fast, but often
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a file of long tests (processes, fake-device meshes, full runs): "
                                       "collected first, so parallel workers do not end on it")


def pytest_collection_modifyitems(config, items):
    """Test files marked slow go first. Workers take whole files (`--dist loadfile`) in collection order;
    alphabetically the longest files (test_multiprocess, test_sharding) came last, and one worker ran
    them alone at the end while the other was idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: files keep their order
