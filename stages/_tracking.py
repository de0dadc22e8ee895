"""MLflow for the stages: one run per training run, continued by every later stage.

The store is $MLFLOW_TRACKING_URI, or by default ``sqlite:///<repo root>/mlflow.db`` with
an absolute path: DVC runs queued experiments in copies under ``.dvc/tmp/exps``, and a
relative path would scatter runs into those copies. Tracking never fails a stage: a call
that fails is reported on stderr and the stage's own outputs are written regardless.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

EXPERIMENT = "mnist-onnx"
CANDIDATE, CHAMPION = "candidate", "champion"  # registry aliases: newest export, promoted one


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


def git_tags() -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    tags = {"git_commit": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no")))}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


class Tracker:
    """A thin, failure-tolerant handle on one MLflow run."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id

    @classmethod
    def start(cls, run_name: str | None, params: dict[str, Any], tags: dict[str, str]) -> "Tracker":
        def go() -> str:
            import mlflow
            mlflow.set_tracking_uri(tracking_uri())
            exp = mlflow.set_experiment(EXPERIMENT)
            run = mlflow.MlflowClient().create_run(exp.experiment_id, run_name=run_name, tags=tags)
            return run.info.run_id
        tracker = cls(_safely("start an MLflow run", go))
        tracker.log_params(params)
        return tracker

    @classmethod
    def resume(cls, run_id_file: Path) -> "Tracker":
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else ""
        if not run_id:
            print(f"warning: no MLflow run id in {run_id_file}; not logging to MLflow", file=sys.stderr)
        return cls(run_id or None)

    def _client(self):
        import mlflow
        mlflow.set_tracking_uri(tracking_uri())
        return mlflow.MlflowClient()

    def log_params(self, params: dict[str, Any]) -> None:
        if self.run_id and params:
            from mlflow.entities import Param
            batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
            _safely("log params", lambda: self._client().log_batch(self.run_id, params=batch))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.run_id and metrics:
            import time
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)]
            _safely("log metrics", lambda: self._client().log_batch(self.run_id, metrics=batch))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id and tags:
            from mlflow.entities import RunTag
            batch = [RunTag(k, str(v)) for k, v in tags.items()]
            _safely("set tags", lambda: self._client().log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self.run_id and Path(path).exists():
            _safely(f"log artifact {path}", lambda: self._client().log_artifact(self.run_id, str(path), folder))

    def log_onnx_model(self, model_path: Path, example, registered_name: str | None = None,
                       version_tags: dict[str, Any] | None = None) -> None:
        """Log the ONNX file with the MLflow ONNX flavour, a signature and an input example;
        with ``registered_name``, make it a new version of that registered model and move the
        alias ``candidate`` to it."""
        if not self.run_id:
            return

        def go():
            import mlflow
            import onnx
            from mlflow.models import infer_signature

            from pipeline import runtime
            proto = runtime.load_checked(model_path)
            logits = runtime.open_session(proto).run(example)
            mlflow.set_tracking_uri(tracking_uri())
            with mlflow.start_run(run_id=self.run_id), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = mlflow.onnx.log_model(
                    onnx.load(model_path), name="onnx-model", signature=infer_signature(example, logits),
                    input_example=example, save_as_external_data=False,
                    pip_requirements=[f"onnxruntime-gpu=={_version('onnxruntime-gpu')}",
                                      f"onnx=={onnx.__version__}", "numpy"],
                )
            if registered_name:
                client = mlflow.MlflowClient()
                version = mlflow.register_model(info.model_uri, registered_name,
                                                tags={k: str(v) for k, v in (version_tags or {}).items()})
                client.set_registered_model_alias(registered_name, CANDIDATE, version.version)
                print(f"registered {registered_name} version {version.version} (alias '{CANDIDATE}')")
        _safely("log the ONNX model", go)

    def tag_model_versions(self, tags: dict[str, Any]) -> None:
        """Add ``tags`` to every registered model version made from this run."""
        if not self.run_id:
            return

        def go():
            client = self._client()
            for mv in client.search_model_versions(f"run_id='{self.run_id}'"):
                for k, v in tags.items():
                    client.set_model_version_tag(mv.name, mv.version, k, str(v))
        _safely("tag the registered model version", go)

    def system_metrics(self):
        """A context that samples CPU, memory (and GPU) into the run while training."""
        import contextlib

        @contextlib.contextmanager
        def monitor():
            mon = None
            if self.run_id:
                def start():
                    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
                    m = SystemMetricsMonitor(self.run_id, sampling_interval=5, tracking_uri=tracking_uri())
                    m.start()
                    return m
                mon = _safely("start system metrics", start)
            try:
                yield
            finally:
                if mon is not None:
                    _safely("finish system metrics", mon.finish)
        return monitor()


def _version(dist: str) -> str:
    from importlib.metadata import version
    return version(dist)


def _safely(what: str, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - tracking must never cost the user a finished stage
        print(f"warning: MLflow: could not {what}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
