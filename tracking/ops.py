"""A logging call as an operation: a small JSON-able dict, applied to MLflow now or replayed
from the spool later, with its original timestamps and steps.

    {"op": "create_run", "run_name", "tags", "start_time"}
    {"op": "log_batch", "metrics": [[key, value, timestamp_ms, step], ...], "params", "tags",
     "logged_model", "dataset": {"name", "digest"}}   (metrics of a model the run logged, on a dataset)
    {"op": "log_inputs", "datasets": [{"name", "digest", "source_type", "source", "context"}, ...]}
    {"op": "log_artifact", "file", "folder"}
    {"op": "log_onnx_model", "model", "example", "name", "registered_name", "version_tags", "step"}
    {"op": "tag_model_versions", "tags"}
    {"op": "rename_run", "name"}
    {"op": "end_run", "status", "end_time"}
    {"op": "champion_if_none"}

A logged model is named in an operation by its name within the run ("fp32", "int8"), and its
id looked up when the operation is applied: a model logged from the spool gets its id only then.

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
        model = op.get("logged_model")
        model_id = registry.logged_model_id(mlflow_client, run_id, model) if model else None
        dataset = op.get("dataset") or {}
        mlflow_client.log_batch(
            run_id, metrics=[Metric(k, float(v), ts, step, model_id=model_id, dataset_name=dataset.get("name"),
                                    dataset_digest=dataset.get("digest")) for k, v, ts, step in op.get("metrics", [])],
            params=[Param(k, v) for k, v in op.get("params", {}).items()],
            tags=[RunTag(k, v) for k, v in op.get("tags", {}).items()])
    elif kind == "log_inputs":
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
        mlflow_client.log_inputs(run_id, datasets=[
            DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"]),
                         [InputTag(MLFLOW_DATASET_CONTEXT, d["context"])]) for d in op["datasets"]])
    elif kind == "rename_run":
        mlflow_client.update_run(run_id, name=op["name"])
    elif kind == "end_run":
        mlflow_client.set_terminated(run_id, op["status"], op["end_time"])
    elif kind == "log_artifact":
        mlflow_client.log_artifact(run_id, op["file"], op.get("folder"))
    elif kind == "log_onnx_model":
        registry.log_onnx_model(run_id, op["model"], op["example"], op.get("name") or "fp32",
                                op.get("registered_name"), op.get("version_tags") or {}, op.get("step", 0))
    elif kind == "tag_model_versions":
        registry.tag_model_versions(mlflow_client, run_id, op["tags"])
    elif kind == "champion_if_none":
        registry.champion_if_none(mlflow_client, run_id)
    else:
        raise ValueError(f"unknown tracking operation {kind!r}")
    return run_id
