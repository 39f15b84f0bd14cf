#!/usr/bin/env bash
# Run on the development machine: downloads the Debian packages the GPU
# machine lacks (headers of HDF5, CLI11, spdlog, fmt, nlohmann-json, GoogleTest, libpng, Gloo, and the
# Fashion-MNIST data) into .gpu/debs, an ignored folder that travels to the
# GPU machine with the device tool's `carry`.  See ../shared/docs/DEVICE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/debs
cd .gpu/debs
pkgs=(libhdf5-dev libhdf5-103-1 libhdf5-cpp-103-1 libhdf5-hl-100 libhdf5-hl-cpp-100 libsz2 libaec0
      libaec-dev libcli11-dev libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 libgtest-dev libgmock-dev
      libjpeg62-turbo libjpeg62-turbo-dev libpng-dev libpng16-16 zlib1g-dev nlohmann-json3-dev dataset-fashion-mnist
      libgloo-dev)
need=()
for p in "${pkgs[@]}"; do ls "${p}"_*.deb >/dev/null 2>&1 || need+=("$p"); done
[ ${#need[@]} -eq 0 ] || { apt-get update -q >/dev/null; apt-get download "${need[@]}"; }
ls -la
