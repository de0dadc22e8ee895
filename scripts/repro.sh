#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole pipeline: dvc repro [ARGS...].
# Offline? Point the download stage at a folder or URL holding the four MNIST .gz files, and the
# web stage at one holding onnxruntime-web's npm tarball (each is still checked against its hash):
#   MNIST_MIRROR=../shared/mnist ONNXRUNTIME_WEB_MIRROR=../shared/onnxruntime-web ./scripts/repro.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
source .venv/bin/activate  # dvc runs each stage's `python -m stages...` from PATH
dvc repro "$@"
python -m commands.compare  # the headline metrics in a few lines (dvc metrics show: the same, as a table)
