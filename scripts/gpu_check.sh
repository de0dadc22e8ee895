#!/usr/bin/env bash
# On the lent GPU machine: install the carried onnxruntime-gpu wheel parts, then run the check.
#   scripts/gpu_check.sh OUT_DIR      (expects .mnist/ with the four .gz files and .ort1..5/)
set -euo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
if ls .ort1/* >/dev/null 2>&1; then
    wheel=$(cat .ort1/name)
    cat .ort1/part .ort2/part .ort3/part .ort4/part .ort5/part > "/tmp/$wheel"
    python3 -m pip install -q --no-deps --target /tmp/site "/tmp/$wheel"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    python3 -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.txt" || true
PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --mirror .mnist --out "$out" 2>&1 | tee "$out/gpu_check.log"
