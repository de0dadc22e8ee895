"""The ONNX model in the run and in MLflow's model registry.

Every export logs the model (ONNX flavour, signature, input example) and registers it as a
new version of ``registry.model_name``, with the alias ``candidate`` moved to it. ``champion``
moves by one rule (``promote``): to a version whose test accuracy is not below the champion's.
``commands.promote`` applies it by hand; the evaluate stage applies it only while the model has
no champion at all, so that ``models:/<name>@champion`` exists after the first ``dvc repro``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from tracking import store
from tracking.provenance import package_version

CANDIDATE, CHAMPION = "candidate", "champion"  # registry aliases: newest export, promoted one
# What the logged model's pyfunc asks onnxruntime for: the GPU where there is one, else the CPU.
# MLflow honours this list from 3.15.0 on (before, its loader dropped it and always ran on CPU).
PYFUNC_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def log_onnx_model(run_id: str, model_path: str, example_file: str, name: str, registered_name: str | None,
                   version_tags: dict[str, str], step: int = 0) -> None:
    """Log the ONNX file to the run as a model of its own (MLflow 3's LoggedModel, ``name``
    within the run: ``fp32``, ``int8``); with a registered name, a new version with the alias
    ``candidate``. ``example_file`` holds the input example and the model's output on it
    (the stage computed both): the file is not loaded, checked or run again here.

    ``step`` is the training step the model comes from (the last epoch's). MLflow copies the
    run's metrics of that step into the model: at the last epoch, its curves' final values;
    at step 0 it would copy the run-level metrics, another model's accuracy among them."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    with np.load(example_file) as arrays:
        example, output = arrays["input"], arrays["output"]
    proto = onnx.load(model_path)
    store.client()  # the store's URI and HTTP settings
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.onnx.log_model(
            proto, name=name, step=step, signature=infer_signature(example, output), input_example=example,
            save_as_external_data=False, onnx_execution_providers=PYFUNC_PROVIDERS,
            pip_requirements=[f"onnxruntime-gpu=={package_version('onnxruntime-gpu')}", f"onnx=={onnx.__version__}",
                              "numpy"])
    if registered_name:
        registered = mlflow.register_model(info.model_uri, registered_name, tags=version_tags)
        mlflow.MlflowClient().set_registered_model_alias(registered_name, CANDIDATE, registered.version)
        print(f"registered {registered_name} version {registered.version} (alias '{CANDIDATE}')")


def logged_model_id(mlflow_client: Any, run_id: str, name: str) -> str:
    """The id of the model called ``name`` that ``run_id`` logged (the newest, if it logged it twice)."""
    experiment = mlflow_client.get_run(run_id).info.experiment_id
    found = mlflow_client.search_logged_models(
        [experiment], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}], max_results=1)
    if not found:
        raise LookupError(f"run {run_id} has logged no model called {name!r}")
    return found[0].model_id


def identity(name: str, sha256: str) -> dict[str, str]:
    """{"registry_model", "registry_version"} of the file with this SHA-256, or {} (see version_of)."""
    version = version_of(name, sha256)
    return {"registry_model": name, "registry_version": version} if version else {}


def version_of(name: str, sha256: str) -> str | None:
    """The registered version of ``name`` whose file has this SHA-256 (its ``sha256`` tag), or
    None: none has, or the tracking store can't be read (a missing sqlite file is not created)."""
    uri = store.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    try:
        versions = store.client().search_model_versions(f"name = '{name}' and tags.sha256 = '{sha256}'")
    except Exception:  # noqa: BLE001 - the store is optional here: down, locked, or without that model
        return None
    newest = max((int(v.version) for v in versions), default=None)
    return None if newest is None else str(newest)


def tag_model_versions(mlflow_client: Any, run_id: str, tags: dict[str, str]) -> None:
    """Add ``tags`` to every registered model version made from ``run_id``."""
    for mv in mlflow_client.search_model_versions(f"run_id='{run_id}'"):
        for k, v in tags.items():
            mlflow_client.set_model_version_tag(mv.name, mv.version, k, v)


class PromotionRefused(PipelineError, ValueError):
    """A version that may not become champion: not evaluated, or less accurate than the champion."""


def accuracy(version: Any) -> float | None:
    """A version's test accuracy, from the evaluate stage's ``eval_accuracy`` tag."""
    value = (version.tags or {}).get("eval_accuracy") if version is not None else None
    return float(value) if value is not None else None


def champion_of(mlflow_client: Any, name: str) -> Any | None:
    """The version aliased ``champion``, or None."""
    from mlflow.exceptions import MlflowException
    try:
        return mlflow_client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def promote(mlflow_client: Any, name: str, version: Any) -> str:
    """Move ``champion`` to ``version`` if its test accuracy is not below the champion's (any
    accuracy beats no champion); says what changed, or raises PromotionRefused."""
    acc = accuracy(version)
    if acc is None:
        raise PromotionRefused(f"{name} version {version.version} has no eval_accuracy tag; "
                               "run the evaluate stage first")
    champion = champion_of(mlflow_client, name)
    champ_acc = accuracy(champion)
    if champion is not None and champ_acc is not None and acc < champ_acc:
        raise PromotionRefused(f"refused: version {version.version} has test accuracy {acc:.4f}, worse than the "
                               f"champion (version {champion.version}, {champ_acc:.4f})")
    mlflow_client.set_registered_model_alias(name, CHAMPION, version.version)
    before = f"version {champion.version} ({champ_acc:.4f})" if champion else "none"
    return f"{name}@{CHAMPION} -> version {version.version} (test accuracy {acc:.4f}); was {before}"


def champion_if_none(mlflow_client: Any, run_id: str) -> None:
    """Each registered model that has no champion yet gets this run's version as its first,
    by ``promote``'s rule, once it is evaluated; where there is a champion, only
    ``commands.promote`` moves it."""
    for mv in mlflow_client.search_model_versions(f"run_id='{run_id}'"):
        version = mlflow_client.get_model_version(mv.name, mv.version)
        if accuracy(version) is not None and champion_of(mlflow_client, mv.name) is None:
            print(promote(mlflow_client, mv.name, version))
