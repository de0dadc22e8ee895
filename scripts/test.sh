#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint (ruff) and type-check (mypy), then run the test suite: pytest [ARGS...].
# The tests download MNIST from a local mirror: $MNIST_MIRROR, else ../shared/mnist; and onnxruntime-web's
# npm tarball from $ONNXRUNTIME_WEB_MIRROR, else ../shared/onnxruntime-web.
set -euo pipefail
cd "$(dirname "$0")/.."
export MNIST_MIRROR=${MNIST_MIRROR:-$(cd .. && pwd)/shared/mnist}
export ONNXRUNTIME_WEB_MIRROR=${ONNXRUNTIME_WEB_MIRROR:-$(cd .. && pwd)/shared/onnxruntime-web}
if [[ "$MNIST_MIRROR" != *://* ]] && ! ls "$MNIST_MIRROR"/*.gz >/dev/null 2>&1; then
    echo "test: no MNIST files in $MNIST_MIRROR; set MNIST_MIRROR to a folder (or URL) holding the four" \
         "MNIST .gz files, e.g. MNIST_MIRROR=/path/to/shared/mnist ./scripts/test.sh" >&2
    exit 2
fi
./scripts/setup.sh

# Debian packages the tests start for real: Chromium and its ChromeDriver (browser tests),
# PostgreSQL (the team's MLflow server), openssh-server (the DVC SSH remote), podman with runc
# and mmdebstrap (the service's image, built on a base made from apt's mirror, and run).
need=()
{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || need+=(chromium chromium-driver)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need+=(postgresql)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
for tool in podman runc mmdebstrap; do
    command -v $tool >/dev/null || [ -x /usr/sbin/$tool ] || [ -x /usr/bin/$tool ] || need+=($tool)
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test: installing Debian's ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "${need[@]}" >/dev/null \
            || { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; }
    else
        echo "test: missing Debian packages ${need[*]}; their tests will be skipped" \
             "(as root: apt-get install ${need[*]})" >&2
    fi
fi
source .venv/bin/activate
echo "test: ruff check"; ruff check .
echo "test: mypy"; mypy
python -m pytest --durations=25 "$@"  # the slowest tests, so creeping cost shows
