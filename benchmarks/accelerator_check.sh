#!/usr/bin/env bash
# The accelerator checks in one prepared run, without Ray: what a short lease on a GPU or NPU machine is for.
#
#   benchmarks/accelerator_check.sh OUT_DIR [DEVICE] [MODEL]     # defaults: cuda, random:vtp-small
#
# Run from the repository root (it puts the tree on PYTHONPATH: no install needed, only torch, numpy, Pillow and
# safetensors). In order of what matters most, each step under its own time limit, everything logged to
# OUT_DIR/log as it comes:
#   1. the versions and devices (`vtp-ray info`);
#   2. the parity fixture against upstream's own outputs (`fixture_parity.py`, fp32 and bf16), then `verify` fp32
#      and bf16 eager against the CPU's fp32 (batch 2 at 256 px; bf16 passes below 5%);
#   3. `bench` fp32 eager at batch 1 and 64, each row beside the device's fp32 GEMM rate;
#   4. `bench` bf16 eager at batch 1, 8 and 64 without CUDA graphs (`--cuda-graphs off`), then with them, eager
#      and compiled (`--compile on`), beside the bf16 GEMM rate;
#   5. `verify` bf16 compiled (from the compile cache step 4 filled: the default one, or VTP_COMPILE_CACHE).
# On CUDA, `verify` also checks the replayed CUDA graphs against the direct calls.
# A step that fails or runs out of time is logged with its exit status and the next one runs.
set -u
out=${1:?usage: benchmarks/accelerator_check.sh OUT_DIR [DEVICE] [MODEL]}
device=${2:-cuda}
model=${3:-random:vtp-small}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cli=(python3 -m vtp_ray.cli)
on=(--model "$model" --device "$device")

step() {
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout "$limit" "$@"
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start)) s"
}

{
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    step info 60 "${cli[@]}" info
    step parity 120 python3 benchmarks/fixture_parity.py --device "$device" --precisions fp32,bf16
    step verify-fp32 120 "${cli[@]}" verify "${on[@]}" --precision fp32 --batch 2
    step verify-bf16 120 "${cli[@]}" verify "${on[@]}" --precision bf16 --batch 2 --max-error 0.05
    step bench-fp32 150 "${cli[@]}" bench "${on[@]}" --precisions fp32 --batch-sizes 1,64
    step bench-bf16-direct 150 "${cli[@]}" bench "${on[@]}" --precisions bf16 --batch-sizes 1,8,64 --cuda-graphs off
    step bench-bf16 300 "${cli[@]}" bench "${on[@]}" --precisions bf16 --batch-sizes 1,8,64 --compile on
    step verify-bf16-compiled 180 "${cli[@]}" verify "${on[@]}" --precision bf16 --batch 2 --max-error 0.05 --compile on
} 2>&1 | tee "$out/log"
