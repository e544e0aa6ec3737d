#!/usr/bin/env bash
# Start Ray on one node of a vtp-ray cluster.
#
#   bash start_node.sh                 # on the head node: prints the cluster's auth token once
#   bash start_node.sh HEAD_IP:6379    # on every other node, with the head's token (see below)
#
# Token authentication (Ray >= 2.52 turns it on by default): every node, and every client that talks to the
# cluster (`ray status`, `serve deploy`, `serve status`, `ray job submit`, `vtp-ray ... --address`), must hold
# the same token: in the environment variable RAY_AUTH_TOKEN, in a file named by RAY_AUTH_TOKEN_PATH, or in
# ~/.ray/auth_token. On the head this script creates ~/.ray/auth_token when no token is set; copy that file
# (or its content, as RAY_AUTH_TOKEN) to the other nodes and clients. RAY_AUTH_MODE=disabled turns the check off
# (only on a private network you trust: anyone who reaches the cluster can then run code on it).
#
# Optional environment:
#   NPUS=8                          declare the node's NPUs, when Ray does not detect them (it reads AscendCL,
#                                   then counts /dev/davinci*); never needed on GPU or CPU nodes
#   ASCEND_RT_VISIBLE_DEVICES=0,1   hand Ray only these NPUs (the rest stay free for other work); Ray then
#                                   gives each replica one of them, through the same variable
#   CANN_ENV=/usr/local/Ascend/ascend-toolkit/set_env.sh   the CANN environment to source (Ascend nodes)
#   RAY_PORT=6379, DASHBOARD_PORT=8265   the head's GCS and dashboard ports
#   RAY_START_ARGS="..."            more `ray start` flags (e.g. --node-ip-address, --num-cpus, --temp-dir)
#   RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=67108864   the largest gRPC message Serve's gRPC proxy takes or sends (64 MiB
#                                   here; Ray's own default is 2 GiB). The proxy reads a whole message before the
#                                   app sees it (and checks the API key, the rate limit, max_body_bytes), so keep it
#                                   near the app's limits: above max_body_bytes (16 MiB) for requests and above the
#                                   largest answer (a decode of max_decode_pixels: 48 MiB of uint8).
set -euo pipefail

cann_env="${CANN_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}"
if [[ -f "$cann_env" ]]; then
  # shellcheck disable=SC1090
  source "$cann_env"
fi
export RAY_SERVE_GRPC_MAX_MESSAGE_SIZE="${RAY_SERVE_GRPC_MAX_MESSAGE_SIZE:-67108864}"
# Say the mode explicitly, so that this script, `ray start` and `ray status` agree on it.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == token && $# -eq 0 && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  ray get-auth-token --generate >/dev/null  # creates ~/.ray/auth_token unless it exists
  echo "Cluster token: ~/.ray/auth_token. Give every other node and client the same (RAY_AUTH_TOKEN or the file)."
fi

args=()
if [[ -n "${NPUS:-}" ]]; then
  args+=(--resources "{\"NPU\": ${NPUS}}")
fi
# shellcheck disable=SC2206
extra=(${RAY_START_ARGS:-})

if [[ $# -eq 0 ]]; then
  # The dashboard is where `serve deploy`, `serve status` and `ray job submit` connect.
  port="${RAY_PORT:-6379}"
  ray start --head --port "$port" --dashboard-host 0.0.0.0 --dashboard-port "${DASHBOARD_PORT:-8265}" \
    ${args[@]+"${args[@]}"} ${extra[@]+"${extra[@]}"}
  address="127.0.0.1:$port"
else
  ray start --address "$1" ${args[@]+"${args[@]}"} ${extra[@]+"${extra[@]}"}
  address="$1"
fi
ray status --address "$address"
