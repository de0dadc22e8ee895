"""A logging call as an operation: a small JSON-able dict, applied to MLflow now or replayed
from the spool later, with its original timestamps and steps.

    {"op": "create_run", "run_name", "tags", "start_time"}
    {"op": "log_batch", "metrics": [[key, value, timestamp_ms, step], ...], "params", "tags"}
    {"op": "log_artifact", "file", "folder"}
    {"op": "log_onnx_model", "model", "example", "registered_name", "version_tags"}
    {"op": "tag_model_versions", "tags"}
    {"op": "champion_if_none"}

``FILE_FIELDS`` name the fields that point at files: the spool keeps copies of those.
"""
from __future__ import annotations

from tracking import registry, store

FILE_FIELDS = ("file", "model", "example")


def apply(op: dict, run_id: str | None) -> str | None:
    """Carry out one operation; returns the run id (a new one for create_run)."""
    from mlflow.entities import Metric, Param, RunTag

    mlflow_client = store.client()
    kind = op["op"]
    if kind == "create_run":
        run = mlflow_client.create_run(store.experiment_id(mlflow_client), run_name=op.get("run_name"),
                                       tags=op["tags"], start_time=op["start_time"])
        return run.info.run_id
    assert run_id is not None, f"{kind} needs a run"
    if kind == "log_batch":
        mlflow_client.log_batch(
            run_id, metrics=[Metric(k, float(v), ts, step) for k, v, ts, step in op.get("metrics", [])],
            params=[Param(k, v) for k, v in op.get("params", {}).items()],
            tags=[RunTag(k, v) for k, v in op.get("tags", {}).items()])
    elif kind == "log_artifact":
        mlflow_client.log_artifact(run_id, op["file"], op.get("folder"))
    elif kind == "log_onnx_model":
        registry.log_onnx_model(run_id, op["model"], op["example"], op.get("registered_name"),
                                op.get("version_tags") or {})
    elif kind == "tag_model_versions":
        registry.tag_model_versions(mlflow_client, run_id, op["tags"])
    elif kind == "champion_if_none":
        registry.champion_if_none(mlflow_client, run_id)
    else:
        raise ValueError(f"unknown tracking operation {kind!r}")
    return run_id
