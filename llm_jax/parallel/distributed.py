"""Joining JAX's multi-controller runtime: one process per host (or per GPU), all equal."""

from __future__ import annotations

import logging
import os

import jax

from llm_jax.config import DistributedConfig

log = logging.getLogger(__name__)

# Environment variables that mean "this process is one of several", per cluster kind.
_CLUSTER_MARKERS = {
    "SLURM": ("SLURM_JOB_ID", "SLURM_NTASKS"),
    "Kubernetes indexed job": ("JOB_COMPLETION_INDEX",),
    "TPU pod": ("TPU_WORKER_HOSTNAMES",),
}


def _detected_cluster() -> str | None:
    """Names the cluster this process runs in when it is a multi-process job, else None."""
    if "SLURM_NTASKS" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "TPU pod"
    if "JOB_COMPLETION_INDEX" in os.environ:
        return "Kubernetes indexed job"
    return None


def initialize(config: DistributedConfig) -> None:
    """Calls `jax.distributed.initialize` when the run spans several processes.

    Explicit settings (config or LLM_JAX_COORDINATOR / LLM_JAX_NUM_PROCESSES / LLM_JAX_PROCESS_ID)
    win; otherwise JAX's own cluster detection is used on TPU pods, SLURM and Kubernetes; otherwise
    this is a single-process run and nothing is done.
    """
    coordinator = config.coordinator or os.environ.get("LLM_JAX_COORDINATOR", "")
    num_processes = config.num_processes or _env_int("LLM_JAX_NUM_PROCESSES")
    process_id = config.process_id if config.process_id is not None else _env_int("LLM_JAX_PROCESS_ID")
    if coordinator or (num_processes or 1) > 1:
        log.info("joining %s processes at %s as process %s", num_processes, coordinator, process_id)
        jax.distributed.initialize(coordinator_address=coordinator or None, num_processes=num_processes,
                                   process_id=process_id)
        return
    cluster = _detected_cluster()
    if cluster is not None:
        log.info("joining a %s run (auto-detected)", cluster)
        jax.distributed.initialize(local_device_ids=slurm_local_device_ids(os.environ))


def slurm_local_device_ids(environ) -> list[int] | None:
    """All GPUs of the node when SLURM runs one process per node, else None (JAX's default).

    JAX's SLURM detection assumes one process per GPU and gives each process only the GPU of its
    local rank; with one process per node that would leave all but one GPU idle.
    """
    try:
        tasks, nodes = int(environ["SLURM_NTASKS"]), int(environ["SLURM_JOB_NUM_NODES"])
        gpus = int(environ["SLURM_GPUS_ON_NODE"])
    except (KeyError, ValueError):
        return None
    if tasks == nodes and gpus > 1:
        return list(range(gpus))
    return None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None
