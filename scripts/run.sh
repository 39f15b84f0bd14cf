#!/usr/bin/env bash
# Sets everything up, builds, and runs aq's main job on its defaults:
# aq-train, i.e. preact_resnet20 on Fashion-MNIST (Debian's
# dataset-fashion-mnist) with 2-bit activation compression for 20 epochs,
# checkpoints in results/fmnist, one TSV line per epoch on stdout.
# Arguments are passed on to aq-train (e.g. --epochs 1, -c fanin).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
exec "${AQ_BUILD:-build}/tools/aq-train" --workspace results/fmnist "$@"
