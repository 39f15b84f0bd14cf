#!/usr/bin/env bash
# Configures (once) and builds aq in build/ (or $AQ_BUILD).  Extra arguments
# go to `meson setup`, e.g. -Dcuda=disabled; $AQ_TARGETS, if set, names the
# ninja targets to build (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${AQ_BUILD:-build}
if [ ! -f "$B/build.ninja" ]; then
  # LibTorch: python3's torch, else the virtual environment scripts/setup.sh
  # may have made, else $AQ_TORCH_DIR.
  VENV=${AQ_VENV:-$HOME/.local/share/aq/venv}
  find_torch='import importlib.util, os; s = importlib.util.find_spec("torch"); print(os.path.dirname(s.origin) if s else "")'
  dir=${AQ_TORCH_DIR:-$(python3 -c "$find_torch" 2>/dev/null || true)}
  if [ -z "$dir" ] && [ -x "$VENV/bin/python3" ]; then dir=$("$VENV/bin/python3" -c "$find_torch"); fi
  meson setup "$B" ${dir:+-Dtorch_dir=$dir} "$@" >&2
fi
ninja -C "$B" ${AQ_TARGETS:-} >&2
