"""Joining a multi-process run: what is detected from the cluster's environment."""

import subprocess
from pathlib import Path

import yaml

from llm_jax.parallel import distributed

SLURM = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}


def test_slurm_one_process_per_node_gets_every_gpu_of_its_node():
    assert distributed.slurm_local_device_ids({**SLURM, "SLURM_NTASKS": "2"}) == list(range(8))


def test_slurm_one_process_per_gpu_keeps_jax_default():
    assert distributed.slurm_local_device_ids({**SLURM, "SLURM_NTASKS": "16"}) is None
    assert distributed.slurm_local_device_ids({"SLURM_NTASKS": "2"}) is None  # no GPUs requested


def test_cluster_detection(monkeypatch):
    for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)
    assert distributed._detected_cluster() is None
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed._detected_cluster() is None  # a single task is a single process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed._detected_cluster() == "SLURM"
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert distributed._detected_cluster() == "TPU pod"
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    assert distributed._detected_cluster() == "Kubernetes indexed job"


def test_launch_recipes_use_the_names_the_code_reads():
    launch = Path(__file__).parent.parent / "scripts" / "launch"
    service, job = yaml.safe_load_all((launch / "k8s_indexed_job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert set(env) == {"LLM_JAX_COORDINATOR", "LLM_JAX_NUM_PROCESSES", "LLM_JAX_PROCESS_ID"}
    source = Path(distributed.__file__).read_text()
    assert all(f'"{name}"' in source for name in env)
    hosts = int(env["LLM_JAX_NUM_PROCESSES"]["value"])
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == hosts
    # The coordinator is pod 0 of the Job behind the headless Service, on the Service's port.
    assert env["LLM_JAX_COORDINATOR"]["value"] == f"{job['metadata']['name']}-0.{pod['subdomain']}:1234"
    assert service["spec"]["clusterIP"] == "None" and service["metadata"]["name"] == pod["subdomain"]
    for script in ("tpu_vm_pod.sh", "slurm_gpu.sbatch"):
        assert subprocess.run(["bash", "-n", str(launch / script)]).returncode == 0, script
