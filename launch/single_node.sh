#!/usr/bin/env bash
# One machine, NPROC processes (one per GPU), through the DeepSpeed launcher.
#
#   launch/single_node.sh 8 --recipe tf_efficientnet_b0 --run-dir runs/b0 [key=value ...]
#   launch/single_node.sh 8 --recipe tf_efficientnet_b0 --run-dir runs/b0 --resume
#
# Global batch = NPROC x train.micro_batch x train.grad_accum; the lr is scaled from it.
# On a machine without GPUs DeepSpeed uses its CPU accelerator and gloo, and --num_gpus counts
# processes all the same; each rank then takes cores / NPROC threads unless OMP_NUM_THREADS is set.
set -euo pipefail

NPROC=${1:?usage: launch/single_node.sh NPROC [train arguments and key=value overrides]}
shift
cd "$(dirname "$0")/.."

exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
    --module trainer train "$@"
