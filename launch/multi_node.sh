#!/usr/bin/env bash
# Several machines, started from one of them through the DeepSpeed launcher (pdsh over ssh).
#
#   launch/multi_node.sh launch/hostfile.example --recipe tf_efficientnet_b0 --run-dir /shared/runs/b0
#
# Needs: passwordless ssh from this machine to every host in the hostfile (and to itself), pdsh,
# the repository and its .venv at the same path on every host, and --run-dir on a filesystem every
# host sees (rank 0 writes the run files; every rank reads the checkpoint when resuming).
# Variables to pass to the remote ranks (NCCL_SOCKET_IFNAME, ...) go in ./.deepspeed_env, one
# NAME=value a line. MASTER_ADDR defaults to the first host of the hostfile.
set -euo pipefail

HOSTFILE=${1:?usage: launch/multi_node.sh HOSTFILE [train arguments and key=value overrides]}
shift
HOSTFILE=$(realpath "$HOSTFILE")
cd "$(dirname "$0")/.."
FIRST_HOST=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF { print $1; exit }')

exec deepspeed --hostfile "$HOSTFILE" \
    --master_addr "${MASTER_ADDR:-$FIRST_HOST}" --master_port "${MASTER_PORT:-29500}" \
    --module trainer train "$@"
