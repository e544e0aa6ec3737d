#!/usr/bin/env bash
# Start Ray on one node of a vtp-ray cluster.
#
#   bash start_node.sh                 # on the head node
#   bash start_node.sh HEAD_IP:6379    # on every other node
#
# Optional environment:
#   NPUS=8                          declare the node's NPUs, when Ray does not detect them (it reads AscendCL,
#                                   then counts /dev/davinci*); never needed on GPU or CPU nodes
#   ASCEND_RT_VISIBLE_DEVICES=0,1   hand Ray only these NPUs (the rest stay free for other work); Ray then
#                                   gives each replica one of them, through the same variable
#   CANN_ENV=/usr/local/Ascend/ascend-toolkit/set_env.sh   the CANN environment to source (Ascend nodes)
set -euo pipefail

cann_env="${CANN_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}"
if [[ -f "$cann_env" ]]; then
  # shellcheck disable=SC1090
  source "$cann_env"
fi
# Replicas share their node's cores with the Serve proxy, the ingress and decoding tasks: idle OpenMP threads
# must sleep, not spin (busy-waiting slows torch severalfold when a thread is preempted).
export OMP_WAIT_POLICY=PASSIVE

args=()
if [[ -n "${NPUS:-}" ]]; then
  args+=(--resources "{\"NPU\": ${NPUS}}")
fi

if [[ $# -eq 0 ]]; then
  # The dashboard (port 8265) is where `serve deploy`, `serve status` and `ray job submit` connect.
  ray start --head --port 6379 --dashboard-host 0.0.0.0 ${args[@]+"${args[@]}"}
else
  ray start --address "$1" ${args[@]+"${args[@]}"}
fi
ray status
