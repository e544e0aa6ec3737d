#!/usr/bin/env bash
# Tokenize an image tree on the whole cluster, submitted as a Ray job (the driver runs on the head node and
# keeps running when this terminal goes away). Run it again with the same output to finish an interrupted run:
# inputs already done are skipped.
#
#   HEAD=10.0.0.1 bash tokenize_job.sh /data/imagenet/train /data/latents/imagenet-train
#
# Every node needs vtp-ray installed and the model at MODEL; the inputs must be readable from every node
# (shared filesystem or object storage); the output is written by the driver (head node or object storage).
# `ray job submit` presents the cluster's token when token authentication is on: set RAY_AUTH_MODE=token and the
# token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; see start_node.sh). DASHBOARD_PORT: the head's
# dashboard port, as start_node.sh was given it (default 8265).
set -euo pipefail

inputs="$1"
output="$2"
model="${MODEL:-/models/VTP-Small-f16d64}"

ray job submit --address "http://${HEAD:?set HEAD to the head node address}:${DASHBOARD_PORT:-8265}" -- \
  vtp-ray tokenize "$inputs" --output "$output" --model "$model" \
  --size 256 --batch-size 64 --flip --labels-from-dirs --address auto
# One replica per NPU (GPU) of the cluster; --replicas 4-16 lets the pool grow and shrink instead.
# Follow it: ray job logs --follow JOB_ID; stop it: ray job stop JOB_ID (what is written so far is kept).
