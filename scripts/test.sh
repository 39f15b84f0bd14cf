#!/usr/bin/env bash
# Sets everything up, builds, and runs the whole test suite (GoogleTest unit
# tests and CLI tests); ends with one line "N passed, N failed, N skipped".
set -uo pipefail
cd "$(dirname "$0")/.."
B=${AQ_BUILD:-build}
scripts/setup.sh || { echo "0 passed, 1 failed (setup)"; exit 1; }
scripts/build.sh || { echo "0 passed, 1 failed (build)"; exit 1; }
meson test -C "$B" --print-errorlogs --num-processes "$(nproc)" "$@"
status=$?
python3 scripts/test_summary.py "$B" || status=1
exit $status
