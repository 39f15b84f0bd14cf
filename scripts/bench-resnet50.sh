#!/usr/bin/env bash
# The ResNet-50 performance table (docs/resnet50-h100.md): training-step
# speed and memory against exact LibTorch, and the largest batch, for bf16
# autocast and fp32, all measured in one process per table so every ratio
# has its baseline from the same run.  Run it on a GPU machine with aq built
# (scripts/build.sh, or scripts/gpu-test.sh on the project's GPU machine):
#   scripts/bench-resnet50.sh [BUILD_DIR] [OUT_DIR]
# Prints the tables; OUT_DIR (default results/bench) keeps them as TSV with
# the per-scope profile of each step table and the per-operation memory of
# an fp32 step.
set -uo pipefail
cd "$(dirname "$0")/.."
B=${1:-build}/tools
OUT=${2:-results/bench}
mkdir -p "$OUT"
status=0
run() {  # name, command...
  local name=$1
  shift
  echo "## $name: $*" >&2
  "$@" >"$OUT/$name.tsv" 2>"$OUT/$name.log" || { echo "$name failed (log: $OUT/$name.log)" >&2; status=1; }
  cat "$OUT/$name.tsv"
}
date -u +"%Y-%m-%d %H:%M UTC" >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2
run step-bf16 "$B/aq-bench" step --arch resnet50 -b 256 --amp bf16 --levels L3 --steps 10 --profile "$OUT/step-bf16.profile.tsv"
run step-fp32 "$B/aq-bench" step --arch resnet50 -b 256 --levels L3 --steps 10 --profile "$OUT/step-fp32.profile.tsv"
run memory-fp32 "$B/aq-bench" memory --arch resnet50 -b 256 --levels L3,L3.1,L5 --ops "$OUT/memory-fp32.ops.tsv"
run max-batch-fp32 "$B/aq-bench" max-batch --arch resnet50 --levels L3,L3.1,L5 --start 512
run max-batch-bf16 "$B/aq-bench" max-batch --arch resnet50 --amp bf16 --levels L3 --start 1024
exit $status
