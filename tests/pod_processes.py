"""Starts several local `llm-jax` processes joined by JAX's distributed runtime: a pod on one machine.

Each process gets its own fake CPU devices (XLA_FLAGS) and joins the coordinator on 127.0.0.1
through the `distributed.*` config keys, exactly as a user would on a cluster.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
                "TF_CPP_MIN_LOG_LEVEL": "2"})
    env.update(extra or {})
    return env


def launch(args: list[str], num_processes: int = 2, devices_per_process: int = 2, env: dict | None = None,
           cwd: str | Path | None = None, module: str = "llm_jax.cli") -> list[subprocess.Popen]:
    """Starts `python -m <module> *args` once per process; output goes to a temporary file each."""
    port = free_port()
    procs = []
    for pid in range(num_processes):
        joined = [*args, f"distributed.coordinator=127.0.0.1:{port}", f"distributed.num_processes={num_processes}",
                  f"distributed.process_id={pid}"]
        log = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen([sys.executable, "-m", module, *joined], cwd=cwd or REPO,
                                env=process_env(devices_per_process, env), stdout=log, stderr=subprocess.STDOUT)
        proc.log = log
        procs.append(proc)
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """(return code, output) per process; kills every process if any runs past `timeout`."""
    results = []
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
    for proc in procs:
        proc.log.seek(0)
        results.append((proc.returncode, proc.log.read()))
        proc.log.close()
    return results
