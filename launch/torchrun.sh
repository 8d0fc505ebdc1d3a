#!/usr/bin/env bash
# The same training under torchrun instead of the DeepSpeed launcher: the trainer reads RANK,
# LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT from the environment, whoever sets them.
#
# one machine, 8 processes:
#   launch/torchrun.sh 8 --recipe tf_efficientnet_b0 --run-dir runs/b0
# which runs
#   torchrun --standalone --nproc_per_node 8 -m trainer train --recipe tf_efficientnet_b0 --run-dir runs/b0
#
# several machines: run on each, with the same RDZV_ENDPOINT (host:port of any one of them):
#   NNODES=2 RDZV_ENDPOINT=node-001:29500 launch/torchrun.sh 8 --recipe tf_efficientnet_b0 --run-dir /shared/runs/b0
set -euo pipefail

NPROC=${1:?usage: launch/torchrun.sh NPROC_PER_NODE [train arguments and key=value overrides]}
shift
cd "$(dirname "$0")/.."

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    exec torchrun --nnodes "${NNODES:?set NNODES with RDZV_ENDPOINT}" --nproc_per_node "$NPROC" \
        --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-efficientnet}" \
        -m trainer train "$@"
fi
exec torchrun --standalone --nproc_per_node "$NPROC" -m trainer train "$@"
