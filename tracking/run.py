"""Tracker: the handle a stage logs through, one MLflow run per training.

Tracking never fails a stage and never loses what it was given. Each call is an operation
(tracking.ops) applied to MLflow; one that cannot be applied (server down or dying, sqlite
locked by a parallel experiment) goes to the spool (tracking.spool), and every later call of
that run queues behind it so the order holds. The next stage that starts, or
``python -m commands.sync``, replays the spool. After the first failure a tracker stops
calling MLflow and spools at once: a dead server costs seconds, not minutes.
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pipeline import atomic
from tracking import ops, spool, store
from tracking.datasets import Dataset

T = TypeVar("T")


class Connection:
    """Whether MLflow has failed this tracker: after one failure, nothing more is attempted."""

    def __init__(self) -> None:
        self.offline = False
        self.seconds = 0.0  # wall time the caller spent logging (MLflow calls and spool writes)

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def attempt(self, what: str, fn: Callable[[], T], lock_retries: int = 10) -> T | None:
        """fn() or, if MLflow fails, None, a one-line warning, and no more attempts.

        A sqlite store locked by a parallel experiment is waited for (about a second per retry).
        """
        if self.offline:
            return None
        for attempt in range(lock_retries + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - tracking must never cost the user a finished stage
                if "database is locked" in str(e) and attempt < lock_retries:
                    time.sleep(0.5 + attempt * 0.1)
                    continue
                self.offline = True
                print(f"warning: MLflow: could not {what} ({type(e).__name__}: {str(e)[:200]}); "
                      f"kept in {store.spool_dir()} for replay", file=sys.stderr)
                return None
        return None

    def replay_pending(self) -> None:
        """What earlier stages could not log goes first; if the store still fails, this
        tracker spools from the start rather than waiting on it call after call."""
        if spool.pending_keys() and not self.offline and not spool.replay()[1]:
            self.offline = True


def note_opened_run(note: Path, fingerprint: str, key: str | None) -> None:
    """Record which run a training opened, before its first checkpoint can."""
    atomic.write_json(note, {"fingerprint": fingerprint, "run": key})


def opened_run(note: Path, fingerprint: str) -> str | None:
    """The run a killed training of the same fingerprint opened, if the note says one."""
    try:
        opened = json.loads(note.read_text())
    except (OSError, ValueError):
        return None
    return opened.get("run") if isinstance(opened, dict) and opened.get("fingerprint") == fingerprint else None


def training_run(checkpoint_key: str | None, note: Path, fingerprint: str, run_name: str | None,
                 params: dict[str, Any], tags: Callable[[], dict[str, str]]) -> Tracker:
    """The one MLflow run of a training: the run a killed training opened (from its checkpoint,
    or, killed before the first checkpoint, from the note written when it was opened), else a
    new one, noted at once. ``tags`` is called only for a new run."""
    key = checkpoint_key or opened_run(note, fingerprint)
    if key:
        print(f"continuing MLflow run {key}, opened by a training that was killed")
        tracker = Tracker(key)  # an MLflow run id, or a pending one
        if run_name:
            tracker.rename(run_name)  # the experiment that finishes the training names its run
        return tracker
    tracker = Tracker.start(run_name, params, tags())
    note_opened_run(note, fingerprint, tracker.key)
    return tracker


class Tracker:
    """One MLflow run: calls go to MLflow while it answers, else to the spool, never lost."""

    def __init__(self, key: str | None, connection: Connection | None = None):
        self.key = key  # the run id, or a pending key until replay creates the run; None: no tracking
        self.connection = connection or Connection()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, if MLflow has given one."""
        if not self.key or not self.key.startswith(spool.PENDING):
            return self.key
        return spool.ids().get(self.key)

    @property
    def seconds(self) -> float:
        """Wall time this tracker has cost its caller so far."""
        return self.connection.seconds

    @classmethod
    def start(cls, run_name: str | None, params: dict[str, Any], tags: dict[str, str]) -> Tracker:
        connection = Connection()
        with connection.timed():
            connection.replay_pending()
            op = {"op": "create_run", "run_name": run_name, "tags": {k: str(v) for k, v in tags.items()},
                  "start_time": int(time.time() * 1000)}
            key = connection.attempt("start an MLflow run", lambda: ops.apply(op, None))
            if key is None:
                key = spool.PENDING + uuid.uuid4().hex
                spool.add(key, op)
                print(f"warning: MLflow: run {key} will be created when {store.tracking_uri()} answers "
                      "(python -m commands.sync, or the next stage)", file=sys.stderr)
        tracker = cls(key, connection)
        tracker.log_params(params)
        return tracker

    @classmethod
    def resume(cls, run_id_file: Path) -> Tracker:
        """The run whose key the train stage wrote to ``run_id_file``."""
        key = run_id_file.read_text().strip() if run_id_file.is_file() else ""
        if not key:
            print(f"warning: no MLflow run id in {run_id_file}; not logging to MLflow", file=sys.stderr)
            return cls(None)
        tracker = cls(key)
        tracker.connection.replay_pending()
        return tracker

    def _do(self, what: str, op: dict) -> None:
        if self.key is None:
            return
        with self.connection.timed():
            if self.key not in spool.pending_keys():  # nothing of this run waits in the spool: keep the order
                run_id = self.run_id
                if run_id and self.connection.attempt(what, lambda: ops.apply(op, run_id)) is not None:
                    return
            spool.add(self.key, op)

    def log_params(self, params: dict[str, Any]) -> None:
        if params:
            self._do("log params", {"op": "log_batch", "params": {k: str(v)[:6000] for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, Any], step: int = 0, model: str | None = None,
                    dataset: Dataset | None = None) -> None:
        """Metrics of the run; with ``model``, of the model of that name the run logged (``fp32``,
        ``int8``), measured on ``dataset``: MLflow's model view and search_logged_models rank by them."""
        now = int(time.time() * 1000)
        rows = [[k, float(v), now, step] for k, v in metrics.items()  # a bool becomes 1.0 or 0.0
                if isinstance(v, (int, float))]
        if rows:
            op: dict[str, Any] = {"op": "log_batch", "metrics": rows}
            if model:
                op["logged_model"] = model  # by name: its id may not exist yet (a model logged from the spool)
            if dataset:
                op["dataset"] = {"name": dataset.name, "digest": dataset.digest}
            self._do("log metrics", op)

    def log_inputs(self, datasets: list[tuple[Dataset, str]]) -> None:
        """The datasets the run read, each with its context (``training``, ``evaluation``)."""
        self._do("log the datasets", {"op": "log_inputs", "datasets": [
            {"name": d.name, "digest": d.digest, "source_type": d.source_type, "source": d.source, "context": context}
            for d, context in datasets]})

    def rename(self, name: str) -> None:
        self._do("rename the run", {"op": "rename_run", "name": name})

    def finish(self) -> None:
        """Mark the run FINISHED: each stage does as it ends, so the run is finished whichever
        stages ran (a later stage logs into it again, and finishes it again)."""
        self._do("finish the run", {"op": "end_run", "status": "FINISHED", "end_time": int(time.time() * 1000)})

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if Path(path).exists():
            self._do(f"log artifact {path}", {"op": "log_artifact", "file": str(Path(path).resolve()),
                                              "folder": folder})

    def log_onnx_model(self, model_path: Path, example: np.ndarray, output: np.ndarray, name: str = "fp32",
                       registered_name: str | None = None, version_tags: dict[str, Any] | None = None,
                       step: int = 0) -> None:
        """The model file as a model of the run called ``name``, with its signature: ``example``
        is an input and ``output`` what the model gives for it (the caller has both; the model is
        not run again here). ``step``: the training step the model comes from (its last epoch)."""
        if self.key is None:
            return
        with tempfile.NamedTemporaryFile(suffix=".npz", delete=False) as f:
            np.savez(f, input=example, output=output)
        example_file = Path(f.name)
        try:
            self._do("log the ONNX model", {
                "op": "log_onnx_model", "model": str(Path(model_path).resolve()), "example": str(example_file),
                "name": name, "registered_name": registered_name, "step": step,
                "version_tags": {k: str(v) for k, v in (version_tags or {}).items()}})
        finally:
            example_file.unlink(missing_ok=True)  # a spooled operation keeps its own copy

    def tag_model_versions(self, tags: dict[str, Any]) -> None:
        """Add ``tags`` to every registered model version made from this run."""
        self._do("tag the registered model version",
                 {"op": "tag_model_versions", "tags": {k: str(v) for k, v in tags.items()}})

    def champion_if_none(self) -> None:
        """This run's registered version becomes champion if the model has none (registry.promote's rule)."""
        self._do("make the first evaluated version champion", {"op": "champion_if_none"})

    @contextlib.contextmanager
    def system_metrics(self) -> Iterator[None]:
        """Samples CPU, memory (and GPU) into the run while the block runs (training).

        Samples taken while the store is down are not spooled: they describe the machine,
        not the model, and MLflow's monitor logs them itself.
        """
        monitor = None
        run_id = self.run_id
        if run_id and not self.connection.offline:
            def start() -> Any:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
                m = SystemMetricsMonitor(run_id, sampling_interval=5, tracking_uri=store.tracking_uri())
                m.start()
                return m
            with self.connection.timed():
                monitor = self.connection.attempt("start system metrics", start)
        try:
            yield
        finally:
            if monitor is not None:
                with self.connection.timed(), contextlib.suppress(Exception), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    monitor.finish()
