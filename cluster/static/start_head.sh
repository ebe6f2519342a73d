#!/usr/bin/env bash
# Start the head of a static Ray cluster on this machine, with token authentication and the dashboard (which
# serves the job API) bound to loopback. Reach the job API from your laptop through SSH:
#     ssh -N -L 8265:127.0.0.1:8265 HEAD      then      instune submit train CONFIG --address http://127.0.0.1:8265
#
# Usage: cluster/static/start_head.sh [more `ray start` options, e.g. --block or --num-cpus 8]
# Environment (defaults in brackets):
#   HEAD_IP          address the other machines reach this one at [127.0.0.1: a one-machine cluster]
#   RAY_PORT         GCS port the workers join [6379]
#   DASHBOARD_PORT   dashboard and job API, on 127.0.0.1 only [8265]
#   RAY_CLIENT_PORT  Ray Client server, bound to HEAD_IP [10001]
#   RAY_AUTH_MODE    token [token]; the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token,
#                    and every worker and client needs the same one (copy the file; never commit it)
# Never open RAY_PORT, DASHBOARD_PORT (8265) or RAY_CLIENT_PORT (10001) to the internet: whoever reaches them can
# run code on every node. Firewall the cluster machines to one another.
set -euo pipefail

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = token ]; then
    # Prints the existing token, or writes a new one to ~/.ray/auth_token when none is configured.
    ray get-auth-token --generate > /dev/null
fi

exec ray start --head \
    --node-ip-address "${HEAD_IP:-127.0.0.1}" \
    --port "${RAY_PORT:-6379}" \
    --include-dashboard true \
    --dashboard-host 127.0.0.1 \
    --dashboard-port "${DASHBOARD_PORT:-8265}" \
    --ray-client-server-port "${RAY_CLIENT_PORT:-10001}" \
    --disable-usage-stats \
    "$@"
