#!/usr/bin/env bash
# Build the inference service's image (the Containerfile) with this checkout's models/model.onnx in it.
#
#   scripts/image.sh [--tag NAME] [--base IMAGE] [-- MORE BUILD FLAGS...]
#
# --tag   the image's name (default mnist-onnx-serve:latest)
# --base  the base image: any with python3 (3.11+) and its venv module (default: the Containerfile's,
#         the official python:3.11-slim-bookworm)
# The engine is podman, else docker; ENGINE="podman --runtime /usr/sbin/runc" (say) chooses it.
# Where pip is configured with a CA bundle of its own (a network that intercepts TLS), the build's
# pip gets it too, as a build secret: it is never stored in the image.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=mnist-onnx-serve:latest
build=()
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag=$2; shift 2 ;;
        --base) build+=(--build-arg "BASE=$2"); shift 2 ;;
        --) shift; break ;;
        *) echo "image: unknown argument $1; usage: scripts/image.sh [--tag NAME] [--base IMAGE] [-- BUILD FLAGS]" >&2
           exit 2 ;;
    esac
done
if [ ! -f models/model.onnx ]; then
    echo "image: no models/model.onnx to put in the image; make it first: ./scripts/repro.sh (or dvc pull)" >&2
    exit 2
fi
read -ra engine <<< "${ENGINE:-$(command -v podman || command -v docker || true)}"
if [ ${#engine[@]} -eq 0 ]; then
    echo "image: neither podman nor docker is installed (Debian: apt-get install podman runc)" >&2
    exit 2
fi
cert=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}
if [ -n "$cert" ] && [ -f "$cert" ]; then
    build+=(--secret "id=pip-cert,src=$cert")
fi
echo "image: building $tag with ${engine[*]}"
"${engine[@]}" build --file Containerfile --tag "$tag" "${build[@]}" "$@" .
size=$("${engine[@]}" image inspect --format '{{.Size}}' "$tag")
echo "image: $tag, $((size / 1000000)) MB; run it with: ${engine[0]##*/} run --rm -p 127.0.0.1:8000:8000 --read-only $tag"
