"""MLflow for the stages: one run per training run, continued by every later stage.

The store is $MLFLOW_TRACKING_URI, or by default ``sqlite:///<repo root>/mlflow.db`` with
an absolute path: DVC runs queued experiments in copies under ``.dvc/tmp/exps``, and a
relative path would scatter runs into those copies.

Tracking never fails a stage and never loses what it was given. Every logging call is an
operation (a small JSON-able dict) applied to MLflow; one that cannot be applied (server
down or dying, sqlite locked by a parallel experiment) goes to a local spool,
``<repo root>/.mlflow-spool/<run>.jsonl`` (or $MLFLOW_SPOOL_DIR), with copies of the files
it refers to, and every later call of that run queues behind it so the order holds.
The next stage that starts (or ``python -m stages.sync``) replays the spool into the run,
with the original timestamps and steps. A run that could not even be created gets a
``pending-...`` id; replay creates it and records which real run it became.

After the first failure a process stops calling MLflow (it spools at once), and MLflow's
HTTP client is held to a few seconds per call: a dead server costs seconds, not minutes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# MLflow's REST client otherwise retries for minutes with backoff; a user's settings win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

EXPERIMENT = "mnist-onnx"
CANDIDATE, CHAMPION = "candidate", "champion"  # registry aliases: newest export, promoted one
PENDING = "pending-"  # prefix of a run id that MLflow has not given yet


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


def git_tags(exclude: tuple[os.PathLike | str, ...] = ()) -> dict[str, str]:
    """The commit, and whether the tree differs from it. ``exclude``: the calling stage's own
    git-tracked outputs, which DVC deletes before running it (they would make every run
    look dirty)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    pathspec = [".", *(f":(exclude){Path(p).as_posix()}" for p in exclude)]
    tags = {"git_commit": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no", "--", *pathspec)))}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


# -- applying operations to MLflow -----------------------------------------------------------

def _client():
    import mlflow
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def _experiment_id(client) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:///"):  # artifacts beside the store, not in a DVC temp copy
        location = (Path(tracking_uri().removeprefix("sqlite:///")).parent / "mlruns").as_uri()
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location)
    except Exception:  # noqa: BLE001 - a parallel experiment created it first
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            raise
        return exp.experiment_id


def _apply(op: dict, run_id: str | None) -> str | None:
    """Carry out one operation; returns the run id (a new one for create_run)."""
    from mlflow.entities import Metric, Param, RunTag

    client = _client()
    kind = op["op"]
    if kind == "create_run":
        run = client.create_run(_experiment_id(client), run_name=op.get("run_name"), tags=op["tags"],
                                start_time=op["start_time"])
        return run.info.run_id
    assert run_id is not None, f"{kind} needs a run"
    if kind == "log_batch":
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v, ts, step in op.get("metrics", [])],
                         params=[Param(k, v) for k, v in op.get("params", {}).items()],
                         tags=[RunTag(k, v) for k, v in op.get("tags", {}).items()])
    elif kind == "log_artifact":
        client.log_artifact(run_id, op["file"], op.get("folder"))
    elif kind == "log_onnx_model":
        _log_onnx_model(run_id, op)
    elif kind == "tag_model_versions":
        for mv in client.search_model_versions(f"run_id='{run_id}'"):
            for k, v in op["tags"].items():
                client.set_model_version_tag(mv.name, mv.version, k, v)
    else:
        raise ValueError(f"unknown tracking operation {kind!r}")
    return run_id


def _log_onnx_model(run_id: str, op: dict) -> None:
    """The ONNX file with the MLflow ONNX flavour, signature and input example; with a
    registered name, a new version of that model, and the alias ``candidate`` moved to it."""
    import mlflow
    import numpy as np
    import onnx
    from mlflow.models import infer_signature

    from pipeline import runtime
    example = np.load(op["example"])
    proto = runtime.load_checked(op["model"])
    logits = runtime.open_session(proto).run(example)
    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.onnx.log_model(
            proto, name="onnx-model", signature=infer_signature(example, logits), input_example=example,
            save_as_external_data=False,
            pip_requirements=[f"onnxruntime-gpu=={package_version('onnxruntime-gpu')}",
                              f"onnx=={onnx.__version__}", "numpy"])
    name = op.get("registered_name")
    if name:
        version = mlflow.register_model(info.model_uri, name, tags=op.get("version_tags") or {})
        mlflow.MlflowClient().set_registered_model_alias(name, CANDIDATE, version.version)
        print(f"registered {name} version {version.version} (alias '{CANDIDATE}')")


# -- the spool ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _spool_lock():
    """One process at a time reads or rewrites the spool (parallel experiments share it)."""
    folder = spool_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ids(folder: Path) -> dict[str, str]:
    path = folder / "ids.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _spool(key: str, op: dict) -> None:
    with _spool_lock() as folder:
        for field in ("file", "model", "example"):  # keep the bytes as they are now
            if field in op:
                src = Path(op[field])
                dest = folder / "files" / uuid.uuid4().hex / src.name
                dest.parent.mkdir(parents=True)
                shutil.copyfile(src, dest)
                op = {**op, field: str(dest)}
        with open(folder / f"{key}.jsonl", "a") as f:
            f.write(json.dumps(op) + "\n")


def pending_keys() -> list[str]:
    folder = spool_dir()
    return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def replay(log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> tuple[dict[str, int], bool]:
    """Apply every spooled operation, oldest first; returns ({run key: operations applied},
    whether the spool is now empty).

    Stops at the first failure of a run's journal and keeps the rest for next time; what was
    applied is removed at once, so a replay that dies midway never applies anything twice.
    """
    done: dict[str, int] = {}
    complete = True
    with _spool_lock() as folder:
        ids = _ids(folder)
        for journal in sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime):
            key = journal.stem
            lines = journal.read_text().splitlines()
            run_id = ids.get(key) or (None if key.startswith(PENDING) else key)
            applied = 0
            try:
                for i, line in enumerate(lines):
                    op = json.loads(line)
                    new_id = _apply(op, run_id)
                    if op["op"] == "create_run":
                        run_id = ids[key] = new_id
                        _write(folder / "ids.json", json.dumps(ids, indent=1))
                    _write(journal, "".join(f"{rest}\n" for rest in lines[i + 1:]))
                    applied += 1
            except Exception as e:  # noqa: BLE001 - kept for the next replay
                log(f"warning: MLflow: replay of {key} stopped after {applied} operations: {type(e).__name__}: {e}")
                done[key] = applied
                complete = False
                break  # the store is not answering: the other journals can wait too
            journal.unlink()
            for op in map(json.loads, lines):
                for field in ("file", "model", "example"):
                    if field in op and Path(op[field]).is_relative_to(folder / "files"):
                        shutil.rmtree(Path(op[field]).parent, ignore_errors=True)
            done[key] = applied
            log(f"MLflow: replayed {applied} spooled operations into run {run_id}")
    return done, complete


# -- the handle the stages use -------------------------------------------------------------------

class Tracker:
    """One MLflow run: calls go to MLflow while it answers, else to the spool, never lost."""

    _offline = False  # set by the first failure in this process: no more waiting on a dead store

    def __init__(self, key: str | None):
        self.key = key  # the run id, or a pending id until replay creates the run; None: no tracking

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, if MLflow has given one."""
        if not self.key or not self.key.startswith(PENDING):
            return self.key
        return _ids(spool_dir()).get(self.key) if spool_dir().is_dir() else None

    @classmethod
    def start(cls, run_name: str | None, params: dict[str, Any], tags: dict[str, str]) -> Tracker:
        _replay_pending()
        op = {"op": "create_run", "run_name": run_name, "tags": {k: str(v) for k, v in tags.items()},
              "start_time": int(time.time() * 1000)}
        key = _attempt("start an MLflow run", lambda: _apply(op, None))
        if key is None:
            key = PENDING + uuid.uuid4().hex
            _spool(key, op)
            print(f"warning: MLflow: run {key} will be created when {tracking_uri()} answers "
                  "(python -m stages.sync, or the next stage)", file=sys.stderr)
        tracker = cls(key)
        tracker.log_params(params)
        return tracker

    @classmethod
    def resume(cls, run_id_file: Path) -> Tracker:
        key = run_id_file.read_text().strip() if run_id_file.is_file() else ""
        if not key:
            print(f"warning: no MLflow run id in {run_id_file}; not logging to MLflow", file=sys.stderr)
            return cls(None)
        _replay_pending()
        return cls(key)

    def _do(self, what: str, op: dict) -> None:
        if self.key is None:
            return
        if self.key not in pending_keys():  # nothing of this run waits in the spool: keep the order
            run_id = self.run_id
            if run_id and _attempt(what, lambda: _apply(op, run_id)) is not None:
                return
        _spool(self.key, op)

    def log_params(self, params: dict[str, Any]) -> None:
        if params:
            self._do("log params", {"op": "log_batch", "params": {k: str(v)[:6000] for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        rows = [[k, float(v), now, step] for k, v in metrics.items()  # a bool becomes 1.0 or 0.0
                if isinstance(v, (int, float))]
        if rows:
            self._do("log metrics", {"op": "log_batch", "metrics": rows})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if tags:
            self._do("set tags", {"op": "log_batch", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if Path(path).exists():
            self._do(f"log artifact {path}", {"op": "log_artifact", "file": str(Path(path).resolve()),
                                              "folder": folder})

    def log_onnx_model(self, model_path: Path, example, registered_name: str | None = None,
                       version_tags: dict[str, Any] | None = None) -> None:
        if self.key is None:
            return
        import tempfile

        import numpy as np
        with tempfile.NamedTemporaryFile(suffix=".npy", delete=False) as f:
            np.save(f, example)
        example_file = Path(f.name)
        try:
            self._do("log the ONNX model", {
                "op": "log_onnx_model", "model": str(Path(model_path).resolve()), "example": str(example_file),
                "registered_name": registered_name,
                "version_tags": {k: str(v) for k, v in (version_tags or {}).items()}})
        finally:
            example_file.unlink(missing_ok=True)  # a spooled operation keeps its own copy

    def tag_model_versions(self, tags: dict[str, Any]) -> None:
        """Add ``tags`` to every registered model version made from this run."""
        self._do("tag the registered model version",
                 {"op": "tag_model_versions", "tags": {k: str(v) for k, v in tags.items()}})

    def system_metrics(self):
        """A context that samples CPU, memory (and GPU) into the run while training.

        Samples taken while the store is down are not spooled: they describe the machine,
        not the model, and MLflow's monitor logs them itself.
        """
        @contextlib.contextmanager
        def monitor():
            mon = None
            run_id = self.run_id
            if run_id and not Tracker._offline:
                def start():
                    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
                    m = SystemMetricsMonitor(run_id, sampling_interval=5, tracking_uri=tracking_uri())
                    m.start()
                    return m
                mon = _attempt("start system metrics", start)
            try:
                yield
            finally:
                if mon is not None:
                    with contextlib.suppress(Exception), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        mon.finish()
        return monitor()


def _attempt(what: str, fn: Callable[[], Any], lock_retries: int = 10):
    """fn() or, if MLflow fails, None, a one-line warning, and no more attempts in this process.

    A sqlite store locked by a parallel experiment is waited for (about a second per retry).
    """
    if Tracker._offline:
        return None
    for attempt in range(lock_retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - tracking must never cost the user a finished stage
            if "database is locked" in str(e) and attempt < lock_retries:
                time.sleep(0.5 + attempt * 0.1)
                continue
            Tracker._offline = True
            print(f"warning: MLflow: could not {what} ({type(e).__name__}: {str(e)[:200]}); "
                  f"kept in {spool_dir()} for replay", file=sys.stderr)
            return None


def _replay_pending() -> None:
    """A stage first replays what earlier ones could not log; if the store still fails, it
    spools from the start rather than waiting on it call after call."""
    if pending_keys() and not Tracker._offline and not replay()[1]:
        Tracker._offline = True
