"""Tracking outages: a real `mlflow server` on 127.0.0.1, down at the start or killed mid-run.

The train stage must finish and write its outs either way, spool what it could not log,
and a replay must leave the run with exactly what the stage logged.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.services import free_port, mlflow_server
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EPOCH_METRICS = ("loss", "train_acc", "test_acc", "test_loss", "images_per_s", "seconds")


def train(workdir: Path, uri: str, epochs: int, wait: bool = True, env: dict | None = None):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["train"]["epochs"] = epochs
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_SPOOL_DIR": str(workdir / "spool"),
           "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "stages.train", "--data", "raw", "--model", "model.pt", "--metrics",
           "train.json", "--plots", "train.csv", "--run-id", "run_id", "--checkpoint", "train.ckpt"]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def sync(workdir: Path, uri: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_SPOOL_DIR": str(workdir / "spool"),
           "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "commands.sync"], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_run_holds_everything_logged(uri: str, run_id: str, workdir: Path, epochs: int) -> None:
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    rows = list(csv.DictReader((workdir / "train.csv").open()))
    assert len(rows) == epochs
    for key in EPOCH_METRICS:  # one point per epoch, steps 1..epochs, the values the stage wrote
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        # nothing else under these keys: the run's mean speed once sat at step 0 of images_per_s
        assert [m.step for m in history] == list(range(1, epochs + 1)), key
        # the CSV holds values rounded to 6 decimals, MLflow the exact ones: equal within that rounding
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in rows], rel=0, abs=1e-6), key
    summary = json.loads((workdir / "train.json").read_text())
    assert run.data.metrics["train_img_per_s"] == round(summary["images_per_s"])  # the headline's train row
    assert run.data.metrics["train_seconds"] == round(summary["train_seconds"], 1)
    assert run.info.status == "FINISHED"  # a training alone finishes its run
    assert run.data.params["train.epochs"] == str(epochs) and run.data.params["model.channels"] == "[4, 8]"
    assert {"git_commit", "torch", "onnxruntime", "device"} <= set(run.data.tags)


def test_server_down_at_the_start(workdir):
    port = free_port()  # nothing listens here yet
    uri = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    code, out, err = train(workdir, uri, epochs=3)
    elapsed = time.perf_counter() - t0
    assert code == 0, err
    for out_file in ("model.pt", "train.json", "train.csv", "run_id"):
        assert (workdir / out_file).stat().st_size > 0
    key = (workdir / "run_id").read_text().strip()
    assert key.startswith("pending-")
    assert err.count("warning: MLflow: could not") == 1  # one failure, then straight to the spool
    assert (workdir / "spool" / f"{key}.jsonl").is_file()
    assert elapsed < 120, elapsed  # generous: the point is that nothing waits on the dead server for long

    still_down = sync(workdir, uri)
    assert still_down.returncode == 1 and "stays in" in still_down.stderr

    with mlflow_server(workdir / "mlflow.db", port):
        result = sync(workdir, uri)
        assert result.returncode == 0, result.stdout + result.stderr
        ids = json.loads((workdir / "spool" / "ids.json").read_text())
        assert_run_holds_everything_logged(uri, ids[key], workdir, epochs=3)
        assert not list((workdir / "spool").glob("*.jsonl"))  # nothing left to replay
        assert sync(workdir, uri).stdout.startswith("sync: nothing to replay")


def test_server_killed_mid_run(workdir):
    import mlflow

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    db = workdir / "mlflow.db"
    epochs = 6
    with mlflow_server(db, port):
        proc = train(workdir, uri, epochs=epochs, wait=False)
        client = mlflow.MlflowClient(tracking_uri=uri)
        logged = 0
        deadline = time.monotonic() + 300
        while logged == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs:
                logged = len(client.get_metric_history(runs[0].info.run_id, "loss"))
    # The server is dead now (SIGKILL), with at least one epoch logged.
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert 1 <= logged < epochs, "the server should die mid-run"
    run_id = (workdir / "run_id").read_text().strip()
    assert not run_id.startswith("pending-")
    assert "kept in" in err and (workdir / "spool" / f"{run_id}.jsonl").is_file()

    with mlflow_server(db, port):
        result = sync(workdir, uri)
        assert result.returncode == 0, result.stdout + result.stderr
        assert_run_holds_everything_logged(uri, run_id, workdir, epochs=epochs)
    shutil.rmtree(workdir / "spool", ignore_errors=True)


def test_a_kill_before_the_first_checkpoint_continues_the_same_run(workdir):
    """Killed before any checkpoint, the restart used to open a second run and leave the
    first RUNNING forever: one training showed as two runs in the dashboard."""
    import mlflow

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    proc = train(workdir, uri, epochs=3, wait=False, env={"DVC_EXP_NAME": "first-attempt"})
    first = ""
    for line in proc.stdout:  # killed as soon as the run is open, long before epoch 1 ends
        if line.startswith("training ") and "MLflow run " in line:
            first = line.split("MLflow run ")[1].strip()
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=60)
    assert first and proc.returncode == -signal.SIGKILL
    assert not (workdir / "train.ckpt").exists()  # really before the first checkpoint

    code, out, err = train(workdir, uri, epochs=3, env={"DVC_EXP_NAME": "the-one-that-finished"})
    assert code == 0, err
    assert f"continuing MLflow run {first}" in out
    assert (workdir / "run_id").read_text().strip() == first
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [first]
    assert runs[0].info.run_name == "the-one-that-finished"  # not the first attempt's name
    assert not (workdir / "train.ckpt.run").exists()  # the note goes with the checkpoint
    assert_run_holds_everything_logged(uri, first, workdir, epochs=3)


def test_git_dirty_ignores_the_stages_own_outputs(tmp_path, monkeypatch):
    """DVC deletes a stage's git-tracked outputs before running it, so every run was tagged
    dirty on a clean tree."""
    from tracking.provenance import git_tags

    for args in (["init", "-q"], ["config", "user.email", "t@localhost"], ["config", "user.name", "t"]):
        subprocess.run(["git", *args], cwd=tmp_path, check=True)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "train.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "c"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics" / "train.json").unlink()  # what DVC does before the stage runs
    assert git_tags(exclude=(Path("metrics/train.json"),))["git_dirty"] == "False"
    assert git_tags()["git_dirty"] == "True"
    (tmp_path / "code.py").write_text("x = 2\n")  # a real change still counts
    assert git_tags(exclude=(Path("metrics/train.json"),))["git_dirty"] == "True"
