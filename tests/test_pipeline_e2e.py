"""The whole DVC pipeline, end to end, on a small subset in a temporary copy of the repository."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo

pytestmark = pytest.mark.slow

SMALL = {
    "train": {"epochs": 1, "subset": 2000, "batch_size": 100},
    "model": {"channels": [8, 16], "fc_units": 64},
    "export": {"parity_images": 200},
}


def dvc(repo: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mirror):
    root = copy_repo(tmp_path_factory.mktemp("repo"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "commit", "-qam", "small params", "--author", "t <t@localhost>"], cwd=root,
                   check=True, env={**os.environ, "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@l"})
    env = {**os.environ, "MNIST_MIRROR": str(mirror),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env.pop("DVC_EXP_NAME", None)
    result = dvc(root, "repro", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, env, result.stdout


def test_repro_runs_every_stage_and_writes_the_outs(repo):
    root, _, out = repo
    for stage in ("download", "train", "export", "evaluate"):
        assert f"Running stage '{stage}'" in out
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["params"] == (5 * 5 * 1 + 1) * 8 + (5 * 5 * 8 + 1) * 16 + (784 + 1) * 64 + (64 + 1) * 10
    assert train["images_per_s"] > 0 and train["peak_rss_mb"] > 0
    export = json.loads((root / "metrics/export.json").read_text())
    assert export["parity_argmax_agreement"] == 1.0
    evaluation = json.loads((root / "metrics/evaluate.json").read_text())
    assert evaluation["images"] == 10_000 and evaluation["accuracy"] > 0.8
    assert len((root / "plots/confusion.csv").read_text().splitlines()) == 10_001
    assert (root / "plots/misclassified.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "models/model.onnx").stat().st_size > 100_000


def test_second_repro_runs_nothing(repo):
    root, env, _ = repo
    lock = (root / "dvc.lock").read_bytes()
    result = dvc(root, "repro", env=env)
    assert result.returncode == 0
    assert "Running stage" not in result.stdout
    assert (root / "dvc.lock").read_bytes() == lock


def test_mlflow_run_holds_params_metrics_and_model(repo):
    root, _, _ = repo
    run_id = (root / "models/mlflow_run_id").read_text().strip()
    db = sqlite3.connect(root / "mlflow.db")
    keys = {k for (k,) in db.execute("select key from params where run_uuid=?", (run_id,))}
    assert {"train.epochs", "model.channels", "train.lr"} <= keys
    metrics = {k for (k,) in db.execute("select distinct key from metrics where run_uuid=?", (run_id,))}
    assert {"loss", "test_acc", "parity_max_abs_diff", "eval_accuracy"} <= metrics
    tags = dict(db.execute("select key, value from tags where run_uuid=?", (run_id,)))
    assert len(tags["git_commit"]) == 40


def test_exp_run_with_a_changed_param_is_a_second_run(repo):
    root, env, _ = repo
    result = dvc(root, "exp", "run", "-S", "train.epochs=2", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    shown = dvc(root, "exp", "show", "--json", env=env)
    assert '"epochs": 2' in shown.stdout.replace("'", '"')
    db = sqlite3.connect(root / "mlflow.db")
    assert db.execute("select count(*) from runs").fetchone()[0] == 2
    names = [v for (v,) in db.execute("select value from tags where key='dvc_exp_name'")]
    assert len(names) == 1
