#!/usr/bin/env bash
# Sets everything up, builds, and runs the whole test suite (GoogleTest unit
# tests and CLI tests), then the unit tests of the readers, the fuzz test and
# the engine again under AddressSanitizer and UBSan in a build of their own
# ($AQ_BUILD-asan; AQ_ASAN=0 leaves them out); ends with one line
# "N passed, N failed, N skipped" over both.  Arguments go to the first
# `meson test` (test names, e.g.).
set -uo pipefail
cd "$(dirname "$0")/.."
B=${AQ_BUILD:-build}
A=${B}-asan
scripts/setup.sh || { echo "0 passed, 1 failed (setup)"; exit 1; }
scripts/build.sh || { echo "0 passed, 1 failed (build)"; exit 1; }
meson test -C "$B" --print-errorlogs --num-processes "$(nproc)" "$@"
status=$?
builds=("$B")
if [ "${AQ_ASAN:-1}" != 0 ]; then
  # The CPU code only (LibTorch's CUDA libraries are not built for
  # sanitizers); -O1 keeps the build and the run short.  The slow training
  # tests (resume, models, modules) and the CLI stay with the build above.
  asan_tests=(fuzz data checkpoint config compress functional allocate)
  if AQ_BUILD=$A AQ_TARGETS="$(printf 'tests/test_%s ' "${asan_tests[@]}")" scripts/build.sh \
      -Db_sanitize=address,undefined -Db_lundef=false -Dcuda=disabled -Doptimization=1 -Ddebug=false -Dcpp_args=-g1; then
    meson test -C "$A" --no-rebuild --print-errorlogs --num-processes "$(nproc)" "${asan_tests[@]}" || status=1
    builds+=("$A")
  else
    echo "sanitizer build failed" >&2
    status=1
  fi
fi
python3 scripts/test_summary.py "${builds[@]}" || status=1
exit $status
