#!/usr/bin/env bash
# Run on the GPU machine (facts in ../shared/docs/DEVICE.md), from the repo
# root, after scripts/gpu-debs.sh here and with .gpu carried: unpacks the
# Debian packages into a private prefix, builds with CUDA, runs every test
# (CUDA tests included) and then whatever command is given, e.g.
#   scripts/gpu-test.sh build/tools/aq-bench kernels
# Set AQ_SKIP_TESTS=1 to only build and run the command, and AQ_TARGETS to
# build only those ninja targets (e.g. "tests/test_transformer").
set -uo pipefail
cd "$(dirname "$0")/.."
P=${AQ_PREFIX:-/tmp/aq-prefix}
mkdir -p "$P/.unpacked"
for f in .gpu/debs/*.deb; do
  s=$P/.unpacked/$(basename "$f")
  [ -f "$s" ] || { dpkg -x "$f" "$P" && touch "$s"; }
done
# zlib1g-dev's libz.so points at /lib/...: aim it at the machine's own zlib.
z=$(ls /lib/x86_64-linux-gnu/libz.so.1 /usr/lib/x86_64-linux-gnu/libz.so.1 2>/dev/null | head -1)
[ -n "$z" ] && ln -sf "$z" "$P/usr/lib/x86_64-linux-gnu/libz.so"
export PKG_CONFIG_SYSROOT_DIR=$P
# Keep -I$P/usr/include: pkg-config drops it as a "system" folder otherwise,
# and the machine's own /usr/include (another libjpeg) would be used instead.
export PKG_CONFIG_ALLOW_SYSTEM_CFLAGS=1
# ... and ahead of every other include folder (the machine has another
# libjpeg's jconfig.h in /usr/include/x86_64-linux-gnu).
export CPPFLAGS="-I$P/usr/include -I$P/usr/include/x86_64-linux-gnu${CPPFLAGS:+ $CPPFLAGS}"
export PKG_CONFIG_PATH=$P/usr/lib/x86_64-linux-gnu/pkgconfig:$P/usr/share/pkgconfig
export LD_LIBRARY_PATH=$P/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=/usr/local/cuda/bin:$PATH
export AQ_FASHION_MNIST=${AQ_FASHION_MNIST:-$P/usr/share/datasets/fashion-mnist}
B=${AQ_BUILD:-build-gpu}
if [ ! -f "$B/build.ninja" ]; then
  meson setup "$B" -Dcuda=enabled || exit 1
fi
# shellcheck disable=SC2086
ninja -C "$B" ${AQ_TARGETS:-} || exit 1
status=0
if [ -z "${AQ_SKIP_TESTS:-}" ]; then
  meson test -C "$B" --print-errorlogs --num-processes 4
  status=$?
  python3 scripts/test_summary.py "$B" || status=1
fi
if [ $# -gt 0 ]; then
  "$@" || status=1
fi
exit $status
