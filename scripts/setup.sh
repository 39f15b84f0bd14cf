#!/usr/bin/env bash
# Installs what aq needs to build and test, on Debian 12 as root (or with
# sudo): Debian's packages, and LibTorch from PyPI's torch wheel (pinned to
# the version on our GPU machine).  Safe to run again: installs only what is
# missing.  The CUDA toolkit, where present, is used as it is.
set -euo pipefail

TORCH_VERSION=2.11.0
PY=${PYTHON:-python3}
PKGS=(meson ninja-build pkg-config g++ libhdf5-dev libcli11-dev libspdlog-dev libfmt-dev
      libgtest-dev libgmock-dev libjpeg-dev dataset-fashion-mnist)

SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

have=$($PY -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
if [ "${have%%+*}" != "$TORCH_VERSION" ]; then
  echo "setup: installing torch==$TORCH_VERSION from PyPI (LibTorch for C++)" >&2
  $PY -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" >&2
fi
