#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint (ruff) and type-check (mypy), then run the test suite: pytest [ARGS...].
# The tests download MNIST from a local mirror: $MNIST_MIRROR, else ../shared/mnist.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

# The browser tests drive Debian's Chromium through its ChromeDriver (no browser download).
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test: installing Debian's chromium and chromium-driver for the browser tests"
        apt-get install -y -q chromium chromium-driver >/dev/null \
            || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
    else
        echo "test: no /usr/bin/chromium + /usr/bin/chromedriver; the browser tests will be skipped" \
             "(as root: apt-get install chromium chromium-driver)" >&2
    fi
fi
source .venv/bin/activate
echo "test: ruff check"; ruff check .
echo "test: mypy"; mypy
export MNIST_MIRROR=${MNIST_MIRROR:-$(cd .. && pwd)/shared/mnist}
python -m pytest "$@"
