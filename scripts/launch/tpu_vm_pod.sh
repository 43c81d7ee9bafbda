#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice: the same command runs on all hosts.
#
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a WORKDIR=/mnt/runs/llama-1b \
#     scripts/launch/tpu_vm_pod.sh setup                                  # copy this checkout, install
#   TPU_NAME=... ZONE=... WORKDIR=... scripts/launch/tpu_vm_pod.sh train configs/llama_1b.yaml [key=value ...]
#
# JAX finds the pod's hosts by itself (TPU_WORKER_HOSTNAMES): no distributed.* keys are needed.
# WORKDIR must be storage every host sees and that outlives the VMs (a Filestore/NFS mount, or a
# bucket mounted with gcsfuse): all hosts write their shards of each checkpoint into it.
# After a preemption, recreate the slice, run `setup` again and the same `train` command: it
# resumes from the newest complete checkpoint in WORKDIR. A maintenance event's SIGTERM makes
# the run finish its step, save and exit 0.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR=${REMOTE_DIR:-llm_jax}
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

case "${1:-}" in
  setup)
    archive=$(mktemp --suffix=.tar.gz)
    git -C "$(dirname "$0")/../.." archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:llm_jax.tar.gz" --zone "$ZONE" --worker=all
    on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf llm_jax.tar.gz -C $REMOTE_DIR && \
      cd $REMOTE_DIR && python3 -m pip install --quiet -e '.[tpu]'"
    ;;
  train)
    : "${WORKDIR:?set WORKDIR (shared storage)}"
    shift
    args=$(printf '%q ' "$@")
    on_all_workers "cd $REMOTE_DIR && python3 -m llm_jax.cli train $args workdir=$WORKDIR train.progress=false"
    ;;
  *)
    echo "usage: $0 setup | train [CONFIG] [key=value ...]" >&2
    exit 2
    ;;
esac
