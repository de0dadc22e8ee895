#!/usr/bin/env bash
# The team's MLflow server: PostgreSQL backend, proxied artifacts, logins (tracking/server.py).
#   MLFLOW_AUTH_ADMIN_PASSWORD=... ./scripts/mlflow_server.sh --data /srv/mlflow [--host H] [--port P]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$repo/.venv/bin/python" ] || "$repo/scripts/setup.sh"
exec env PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$repo/.venv/bin/python" -m tracking.server "$@"
