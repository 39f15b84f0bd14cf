#!/usr/bin/env bash
# The step-speed table of the models ActNN's tables are about, against exact
# LibTorch in the same process (docs/step-speed.md): the main job's
# PreAct-ResNet-20 on 1x28x28, ActNN's CIFAR PreAct-ResNet-56 on 3x32x32,
# ResNet-50 at 224 in fp32 and bf16.  Run it on a GPU machine with aq built:
#   scripts/bench-small.sh [BUILD_DIR] [OUT_DIR] [extra aq-bench step options]
# Prints one TSV table (aq-bench step's columns); OUT_DIR (default
# results/bench-small) keeps each row group's TSV and log.
set -uo pipefail
cd "$(dirname "$0")/.."
B=${1:-build}/tools
OUT=${2:-results/bench-small}
shift $(( $# > 2 ? 2 : $# ))
mkdir -p "$OUT"
status=0
header=1
run() {  # name, aq-bench step options...
  local name=$1
  shift
  echo "## $name: aq-bench step $* $EXTRA" >&2
  # shellcheck disable=SC2086
  "$B/aq-bench" step "$@" $EXTRA >"$OUT/$name.tsv" 2>"$OUT/$name.log" ||
    { echo "$name failed (log: $OUT/$name.log)" >&2; status=1; }
  if [ $header = 1 ]; then cat "$OUT/$name.tsv"; header=0; else tail -n +2 "$OUT/$name.tsv"; fi
}
EXTRA="$*"
date -u +"%Y-%m-%d %H:%M UTC" >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2
run preact20 --arch preact_resnet20 --channels 1 --image-size 28 --classes 10 -b 128 --levels L2,L3
run preact56 --arch preact_resnet56 --channels 3 --image-size 32 --classes 10 -b 128 --levels L2,L3
run resnet50-fp32 --arch resnet50 -b 256 --levels L3 --steps 10
run resnet50-bf16 --arch resnet50 -b 256 --amp bf16 --levels L3 --steps 10
exit $status
