#!/usr/bin/env bash
# The installed tree as another project sees it: `meson install --destdir`
# into a temporary folder gives libaq with its SONAME, libaq.pc, the public
# headers (no spdlog among them), tools whose run paths find libaq in the
# installed tree, man pages and the LICENSE.  examples/library.cpp is then
# built out of tree twice, with every installed header included, from
# nothing but pkg-config's flags: by a plain compiler command line (what a
# Makefile does) and by a Meson project; both binaries train
# (example_library.sh's checks).
#   install.sh BUILD_DIR examples/library.cpp tests/cli/example_library.sh
set -u
BUILD=$1
EXAMPLE=$2
CHECK_EXAMPLE=$3
fail=0
check() { if ! eval "$2"; then echo "FAIL: $1" >&2; [ -n "${AQ_DEBUG:-}" ] && cat "$tmp/err" >&2; fail=1; fi; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
dest=$tmp/dest
# scripts/gpu-test.sh's machine has Debian's headers unpacked under a sysroot
# that pkg-config would put before every path of libaq.pc, LibTorch's
# included: the installed tree's paths are plain, CLI11 comes from there.
if [ -n "${PKG_CONFIG_SYSROOT_DIR:-}" ]; then
  export CPLUS_INCLUDE_PATH=$PKG_CONFIG_SYSROOT_DIR/usr/include${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
  unset PKG_CONFIG_SYSROOT_DIR
fi

meson install -C "$BUILD" --destdir "$dest" --no-rebuild >"$tmp/err" 2>&1; rc=$?
check "meson install --destdir: exit 0" '[ $rc -eq 0 ]'
[ $rc -eq 0 ] || { cat "$tmp/err" >&2; exit 1; }
pc=$(find "$dest" -name libaq.pc | head -1)
check "libaq.pc installed" '[ -n "$pc" ]'
[ -n "$pc" ] || exit 1
export PKG_CONFIG_PATH=$(dirname "$pc")
prefix=$(pkg-config --variable=prefix libaq)
pc_flags() { pkg-config --define-variable=prefix="$dest$prefix" "$@" libaq; }
libdir=$(pc_flags --variable=libdir)
incdir=$(pc_flags --variable=includedir)
bindir=$dest$prefix/bin

lib=$(ls "$libdir"/libaq.so.*.*.* 2>/dev/null | head -1)
check "libaq.so.MAJOR.MINOR.PATCH, SONAME libaq.so.MAJOR, both links" \
  '[ -n "$lib" ] && readelf -d "$lib" | grep -q "SONAME.*\[libaq\.so\.[0-9]*\]" && [ -L "$libdir/libaq.so" ] && [ -L "$libdir/libaq.so.$(pkg-config --modversion libaq | cut -d. -f1)" ]'
check "public headers installed, the spdlog logger not" \
  '[ -f "$incdir/aq/modules.h" ] && [ -f "$incdir/aq/logging.h" ] && [ -f "$incdir/aq/safetensors.h" ] && [ ! -e "$incdir/aq/log.h" ] && ! grep -l "#.*include.*\(spdlog\|fmt/\)" "$incdir"/aq/*.h'
check "LICENSE and man pages installed" \
  '[ -n "$(find "$dest" -path "*doc/aq/LICENSE")" ] && [ -n "$(find "$dest" -name aq-export.1)" ] && [ -n "$(find "$dest" -name aq-checkpoint.5)" ]'
for tool in aq-train aq-eval aq-export aq-bench aq-variance aq-calibrate; do
  "$bindir/$tool" --version >"$tmp/out" 2>"$tmp/err"; rc=$?
  check "installed $tool runs (its run path finds the installed libaq)" \
    '[ $rc -eq 0 ] && ldd "$bindir/$tool" | grep "libaq.so" | grep -q "$dest"'
done

# Every installed header in one translation unit with the example: compiles
# with pkg-config's flags only (no -idirafter: LibTorch's fmt is never met by
# Debian's).
includes=()
for h in "$incdir"/aq/*.h; do includes+=(-include "aq/$(basename "$h")"); done
c++ -std=c++17 "${includes[@]}" "$EXAMPLE" $(pc_flags --cflags --libs) -o "$tmp/example-make" 2>"$tmp/err"; rc=$?
check "out of tree: c++ \$(pkg-config --cflags --libs libaq) builds the example with every header" '[ $rc -eq 0 ]'
[ $rc -eq 0 ] || head -20 "$tmp/err" >&2
if [ $rc -eq 0 ]; then
  "$CHECK_EXAMPLE" "$tmp/example-make"; rc=$?
  check "the out-of-tree example trains, libaq from the installed tree" \
    '[ $rc -eq 0 ] && ldd "$tmp/example-make" | grep "libaq.so" | grep -q "$dest"'
fi

# A Meson project: dependency('libaq'), with the .pc file of an install
# unpacked at $dest$prefix (its prefix line says so).
mkdir -p "$tmp/meson-project" "$tmp/pc"
sed "s|^prefix=.*|prefix=$dest$prefix|" "$pc" >"$tmp/pc/libaq.pc"
cp "$EXAMPLE" "$tmp/meson-project/library.cpp"
cat >"$tmp/meson-project/meson.build" <<'EOF'
project('uses-libaq', 'cpp', default_options: ['cpp_std=c++17', 'buildtype=release'])
executable('example', 'library.cpp', dependencies: dependency('libaq'))
EOF
PKG_CONFIG_PATH=$tmp/pc meson setup "$tmp/meson-build" "$tmp/meson-project" >"$tmp/err" 2>&1 &&
  ninja -C "$tmp/meson-build" >>"$tmp/err" 2>&1; rc=$?
check "out of tree: a Meson project with dependency('libaq') builds the example" '[ $rc -eq 0 ]'
[ $rc -eq 0 ] || tail -20 "$tmp/err" >&2
if [ $rc -eq 0 ]; then
  "$CHECK_EXAMPLE" "$tmp/meson-build/example"; rc=$?
  check "the Meson-built example trains" '[ $rc -eq 0 ]'
fi
exit $fail
