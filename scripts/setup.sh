#!/usr/bin/env bash
# Creates .venv in the repository root and installs the project into it, idempotently.
#
# Which PyTorch build is installed (only when .venv has no torch yet):
#   TORCH_SPEC / TORCH_INDEX_URL set  -> exactly that, e.g.
#       TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu  (small CPU-only wheel)
#   an NVIDIA GPU is visible          -> `torch` from PyPI, whose Linux build is CUDA-enabled
#   otherwise                         -> torch==2.13.0, the version CI tests against
# pyproject.toml itself only asks for torch>=2.4, so it never forces a CPU build on anyone.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_SPEC:-}" ]; then
        spec=$TORCH_SPEC
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        spec=torch
    else
        spec=torch==2.13.0
    fi
    echo "setup: installing $spec${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
    "${pip[@]}" install -q "$spec" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

echo "setup: installing the project and its dependencies"
"${pip[@]}" install -q -e ".[test]"
if .venv/bin/python -m pip show onnxruntime >/dev/null 2>&1; then
    echo "setup: error: the CPU-only 'onnxruntime' is installed and shadows 'onnxruntime-gpu';" >&2
    echo "       run '.venv/bin/pip uninstall -y onnxruntime onnxruntime-gpu' and this script again." >&2
    exit 1
fi
echo "setup: done ($(.venv/bin/python -c 'import torch, onnxruntime as ort; print("torch", torch.__version__, "| onnxruntime", ort.__version__, ort.get_available_providers())'))"
