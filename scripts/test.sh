#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite: pytest [ARGS...].
# The tests download MNIST from a local mirror: $MNIST_MIRROR, else ../shared/mnist.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
source .venv/bin/activate
export MNIST_MIRROR=${MNIST_MIRROR:-$(cd .. && pwd)/shared/mnist}
python -m pytest "$@"
