"""Where runs go, and the MLflow client that talks to it.

The store is $MLFLOW_TRACKING_URI, or by default ``sqlite:///<repo root>/mlflow.db`` with an
absolute path: DVC runs queued experiments in copies under ``.dvc/tmp/exps``, and a relative
path would scatter runs into those copies.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

EXPERIMENT = "mnist-onnx"


def repo_root() -> Path:
    """The user's repository, also when DVC runs us in a temporary experiment copy."""
    here = Path(__file__).resolve().parents[1]
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def spool_dir() -> Path:
    return Path(os.environ.get("MLFLOW_SPOOL_DIR") or repo_root() / ".mlflow-spool")


def client() -> Any:
    """An MlflowClient on ``tracking_uri()``. MLflow's REST client otherwise retries a dead
    server for minutes with backoff: held to one try of 5 s unless the user set otherwise."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    import mlflow
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def experiment_id(mlflow_client: Any) -> str:
    """The experiment's id, created on first use (by us, or by a parallel experiment)."""
    exp = mlflow_client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:///"):  # artifacts beside the store, not in a DVC temp copy
        location = (Path(tracking_uri().removeprefix("sqlite:///")).parent / "mlruns").as_uri()
    try:
        return mlflow_client.create_experiment(EXPERIMENT, artifact_location=location)
    except Exception:  # noqa: BLE001 - a parallel experiment created it first
        exp = mlflow_client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            raise
        return exp.experiment_id
