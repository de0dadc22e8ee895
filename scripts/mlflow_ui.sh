#!/usr/bin/env bash
# Open the MLflow dashboard on this project's store: http://127.0.0.1:${PORT:-5000}
set -euo pipefail
cd "$(dirname "$0")/.."
uri=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}
echo "MLflow UI on $uri -> http://127.0.0.1:${PORT:-5000}"
exec .venv/bin/mlflow ui --backend-store-uri "$uri" --host 127.0.0.1 --port "${PORT:-5000}"
