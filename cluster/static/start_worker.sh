#!/usr/bin/env bash
# Join this machine to a static Ray cluster whose head runs cluster/static/start_head.sh.
#
# Usage: HEAD_IP=10.0.0.5 cluster/static/start_worker.sh [more `ray start` options, e.g. --num-gpus 8]
# Environment (defaults in brackets):
#   HEAD_IP          the head's address (required)
#   RAY_PORT         the head's GCS port [6379]
#   NODE_IP          this machine's address on the cluster network [chosen by Ray]
#   RAY_AUTH_MODE    token [token]; put the head's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH) first
# Every machine must mount the shared storage that configs' output_dir points at, at the same path.
set -euo pipefail

: "${HEAD_IP:?set HEAD_IP to the address of the head node}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
node_ip=()
if [ -n "${NODE_IP:-}" ]; then
    node_ip=(--node-ip-address "$NODE_IP")
fi

exec ray start --address "${HEAD_IP}:${RAY_PORT:-6379}" "${node_ip[@]}" --disable-usage-stats "$@"
