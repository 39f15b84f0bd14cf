#!/usr/bin/env bash
# Configures (once) and builds aq in build/ (or $AQ_BUILD).  Extra arguments
# go to `meson setup`, e.g. -Dcuda=disabled.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${AQ_BUILD:-build}
if [ ! -f "$B/build.ninja" ]; then
  meson setup "$B" "$@" >&2
fi
ninja -C "$B" >&2
