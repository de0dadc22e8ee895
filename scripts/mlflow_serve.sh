#!/usr/bin/env bash
# Serve a registered model with MLflow's model server: POST http://127.0.0.1:${PORT:-5001}/invocations
#   ./scripts/mlflow_serve.sh [MODEL_URI]    default: models:/mnist-cnn-onnx@champion
# It is `mlflow models serve -m MODEL_URI --env-manager local` on this project's store, with the
# virtualenv's bin/ first on PATH: MLflow starts its server as `uvicorn` found on PATH, so
# without it (the virtualenv not activated) the command dies with "exec: uvicorn: not found".
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}
model=${1:-models:/mnist-cnn-onnx@champion}
echo "MLflow model server for $model (store $MLFLOW_TRACKING_URI) -> http://127.0.0.1:${PORT:-5001}/invocations"
exec mlflow models serve -m "$model" --env-manager local --host 127.0.0.1 --port "${PORT:-5001}"
