#!/usr/bin/env bash
# Sets everything up, builds, and runs aq's main job on its defaults.  Until
# training lands, that is the kernel benchmark: `aq-bench kernels` (TSV on
# stdout).  Arguments are passed on to it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
exec "${AQ_BUILD:-build}/tools/aq-bench" kernels "$@"
