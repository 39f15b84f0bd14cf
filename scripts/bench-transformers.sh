#!/usr/bin/env bash
# The transformers' speed and memory tables of docs/transformers.md in one
# run: gpt_small (context 1024, batch 16) and vit_small (224, batch 256) in
# bf16, exact, ckpt and L3 in the same process, then gpt_small's activation
# memory and largest batch.  Run it on a GPU machine with aq built:
#   scripts/bench-transformers.sh [BUILD_DIR] [OUT_DIR] [extra aq-bench options]
# (options the script does not set, e.g. --attention-bits 0 for L3 with
# attention at its adaptive 2 bits).
# Prints each table (aq-bench's TSV) after a line naming it; OUT_DIR
# (default results/bench-transformers) keeps each table's TSV and log.
set -uo pipefail
cd "$(dirname "$0")/.."
B=${1:-build}/tools
OUT=${2:-results/bench-transformers}
shift $(( $# > 2 ? 2 : $# ))
mkdir -p "$OUT"
status=0
run() {  # name, aq-bench command and options...
  local name=$1
  shift
  echo "## $name: aq-bench $* $EXTRA" >&2
  # shellcheck disable=SC2086
  "$B/aq-bench" "$@" $EXTRA >"$OUT/$name.tsv" 2>"$OUT/$name.log" ||
    { echo "$name failed (log: $OUT/$name.log)" >&2; status=1; }
  echo "# $name"
  cat "$OUT/$name.tsv"
}
EXTRA="$*"
date -u +"%Y-%m-%d %H:%M UTC" >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2
gpt=(--arch gpt_small --context 1024 --amp bf16 --levels ckpt,L3)
run gpt-step step "${gpt[@]}" -b 16 --steps 10 --profile-steps 0
run vit-step step --arch vit_small --amp bf16 --levels ckpt,L3 -b 256 --steps 10 --profile-steps 0
run gpt-memory memory "${gpt[@]}" -b 16
run gpt-max-batch max-batch "${gpt[@]}" --start 128 --resolution 32 --steps 2
exit $status
