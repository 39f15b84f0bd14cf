#!/usr/bin/env bash
# Installs what aq needs to build and test, on Debian 12 as root (or with
# sudo): Debian's packages, and LibTorch from PyPI's torch wheel (pinned to
# the version on our GPU machine).  Safe to run again: installs only what is
# missing.  The CUDA toolkit, where present, is used as it is.
set -euo pipefail

TORCH_VERSION=2.11.0
TORCHVISION_VERSION=0.26.0  # torchvision's release for torch 2.11
PY=${PYTHON:-python3}
PKGS=(meson ninja-build pkg-config g++ libhdf5-dev libcli11-dev libspdlog-dev libfmt-dev nlohmann-json3-dev
      libgtest-dev libgmock-dev libjpeg-dev libpng-dev zlib1g-dev dataset-fashion-mnist libgloo-dev)

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

# LibTorch: the torch wheel in python3's site-packages, or, where pip may not
# install there (Debian's externally managed python3), in a virtual
# environment that scripts/build.sh then finds ($AQ_VENV).
VENV=${AQ_VENV:-$HOME/.local/share/aq/venv}
torch_version() { "$1" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true; }
have=$(torch_version "$PY")
[ -x "$VENV/bin/python3" ] && [ "${have%%+*}" != "$TORCH_VERSION" ] && have=$(torch_version "$VENV/bin/python3")
if [ "${have%%+*}" != "$TORCH_VERSION" ]; then
  echo "setup: installing torch==$TORCH_VERSION from PyPI (LibTorch for C++)" >&2
  if ! $PY -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" >&2; then
    echo "setup: pip cannot install into $PY; using a virtual environment in $VENV" >&2
    if ! $PY -m venv --help >/dev/null 2>&1 || ! $PY -c 'import ensurepip' 2>/dev/null; then
      $SUDO apt-get install -y -q --no-install-recommends python3-venv >&2
    fi
    $PY -m venv "$VENV" >&2
    "$VENV/bin/python3" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" >&2
  fi
fi

# The tests' Python side, beside that torch: safetensors writes and reads the
# files aq-export and aq-train --init-from are checked against, torchvision
# (the release made for this torch) holds the reference models.
TPY=$PY
have=$(torch_version "$PY")
[ "${have%%+*}" != "$TORCH_VERSION" ] && [ -x "$VENV/bin/python3" ] && TPY=$VENV/bin/python3
if ! "$TPY" -c 'import safetensors.torch, torchvision' 2>/dev/null; then
  echo "setup: installing safetensors and torchvision==$TORCHVISION_VERSION for the tests" >&2
  "$TPY" -m pip install --quiet --disable-pip-version-check safetensors "torchvision==$TORCHVISION_VERSION" >&2
fi
