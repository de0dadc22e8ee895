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

from tests.conftest import LOCAL_MIRROR, copy_repo

pytestmark = pytest.mark.slow

SMALL = {
    "train": {"epochs": 1, "subset": 2000, "batch_size": 50},
    "model": {"channels": [8, 16], "fc_units": 64},
    "export": {"parity_images": 200},
    "benchmark": {"batch_sizes": [1, 16], "warmup": 1, "min_runs": 3, "min_seconds": 0.0,
                  "calibration_images": 64},
}


def dvc(repo: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    if args[:2] == ("exp", "run"):  # each experiment starts from the committed params
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=repo, check=True)
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
    for stage in ("download", "train", "export", "verify", "evaluate", "triton", "benchmark"):
        assert f"Running stage '{stage}'" in out
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["params"] == (5 * 5 * 1 + 1) * 8 + (5 * 5 * 8 + 1) * 16 + (784 + 1) * 64 + (64 + 1) * 10
    assert train["images_per_s"] > 0 and train["peak_rss_mb"] > 0
    export = json.loads((root / "metrics/export.json").read_text())
    assert export["parity_argmax_agreement"] == 1.0
    evaluation = json.loads((root / "metrics/evaluate.json").read_text())
    assert evaluation["images"] == 10_000 and evaluation["accuracy"] > 0.5  # chance is 0.1; 40 steps of a tiny net
    assert len((root / "plots/confusion.csv").read_text().splitlines()) == 10_001
    assert (root / "plots/misclassified.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "models/model.onnx").stat().st_size > 100_000
    shapes = json.loads((root / "metrics/verify.json").read_text())
    assert shapes["verify_ok"] and shapes["params_onnx"] == train["params"]
    assert "| conv2 | Conv | N x 16 x 14 x 14 | batch x 16 x 14 x 14 | N x 16 x 14 x 14 |" in (
        root / "reports/shapes.md").read_text()
    bench = json.loads((root / "metrics/benchmark.json").read_text())
    assert {(r["path"], r["precision"], r["batch"]) for r in bench["rows"]} == {
        (p, q, b) for p, q in [("onnxruntime-cpu", "fp32"), ("onnxruntime-cpu", "int8"), ("pytorch-cpu", "fp32")]
        for b in (1, 16)} | ({("onnxruntime-cuda", "fp32", b) for b in (1, 16)} if bench["cuda_status"] == "ran" else set())
    assert "ort_vs_torch_cpu_p50_ratio_b1" in bench and bench["hardware"]["cores"]
    for picture in ("conv1_filters", "feature_maps", "confusion", "benchmark"):
        assert (root / f"plots/{picture}.png").read_bytes()[:4] == b"\x89PNG"
    triton = root / "models/triton/mnist-cnn-onnx"
    assert (triton / "1/model.onnx").read_bytes() == (root / "models/model.onnx").read_bytes()
    assert 'backend: "onnxruntime"' in (triton / "config.pbtxt").read_text()


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


@pytest.mark.parametrize("overrides,conv2", [
    (["model.channels=[16,32]", "model.kernel=3"], "N x 32 x 14 x 14"),
    (["model.padding=valid"], "N x 16 x 8 x 8"),  # 28 -> 24 -> 12 -> 8 (-> 4)
])
def test_other_architectures_train_export_and_verify(repo, overrides, conv2):
    root, env, _ = repo
    args = [a for o in overrides for a in ("-S", o)]
    result = dvc(root, "exp", "run", *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((root / "metrics/verify.json").read_text())["verify_ok"]
    assert f"| conv2 | Conv | {conv2} |" in (root / "reports/shapes.md").read_text()


def test_an_architecture_that_does_not_tile_fails_before_training(repo):
    root, env, _ = repo
    lock = (root / "dvc.lock").read_bytes()
    result = dvc(root, "exp", "run", "-S", "model.kernel=3", "-S", "model.padding=valid", env=env)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "pool2 on 11x11x16: stride 2 does not tile the input: (11 - 2 + 2*0)/2 + 1 = 5.5" in out
    assert "epoch 1/" not in out  # refused before any training
    assert (root / "dvc.lock").read_bytes() == lock


def _set_param(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize("stage,section,key,value,message", [
    ("download", "download", "mirrors", ["/nonexistent/mirror"], "could not get a verified copy"),
    ("train", "train", "lr", -1.0, "train.lr=-1.0 is not allowed"),
    ("export", "export", "opset", 5, "export.opset=5 is not allowed"),
    ("evaluate", "evaluate", "batch_size", 0, "evaluate.batch_size=0 is not allowed"),
    ("benchmark", "benchmark", "providers", ["cuda"], "benchmark.providers=['cuda'] is not allowed"),
    ("triton", "triton", "max_batch_size", 0, "triton.max_batch_size=0 is not allowed"),
])
def test_a_failing_stage_exits_nonzero_and_leaves_dvc_lock_untouched(repo, stage, section, key, value, message):
    root, env, _ = repo
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=root, check=True)
    assert dvc(root, "repro", env=env).returncode == 0  # back to the committed params
    lock = (root / "dvc.lock").read_bytes()
    _set_param(root, section, key, value)
    if stage == "download":  # only the bad mirror in params, and no override
        env = {**env, "MNIST_MIRROR": ""}
    result = dvc(root, "repro", env=env)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert (root / "dvc.lock").read_bytes() == lock
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=root, check=True)
    result = dvc(root, "repro", env={**env, "MNIST_MIRROR": str(LOCAL_MIRROR)})
    assert result.returncode == 0, result.stdout + result.stderr  # no manual clean-up needed


def test_verify_fails_on_a_damaged_model_and_leaves_dvc_lock_untouched(repo):
    root, env, _ = repo
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=root, check=True)
    assert dvc(root, "repro", env=env).returncode == 0
    lock = (root / "dvc.lock").read_bytes()
    model = root / "models/model.onnx"
    model.chmod(0o644)
    model.write_bytes(model.read_bytes()[:50_000])
    result = dvc(root, "repro", "--single-item", "verify", env=env)
    assert result.returncode != 0
    assert "is not a readable ONNX model" in result.stdout + result.stderr
    assert (root / "dvc.lock").read_bytes() == lock
    assert dvc(root, "repro", env=env).returncode == 0  # export runs again and mends it


def _stage(root: Path, env: dict, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_registered_version_promotion_and_serving(repo, test_split):
    import mlflow
    import numpy as np

    root, env, _ = repo
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=root, check=True)
    assert dvc(root, "repro", env=env).returncode == 0
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    name = "mnist-cnn-onnx"
    cand = client.get_model_version_by_alias(name, "candidate")
    acc = float(cand.tags["eval_accuracy"])
    assert acc == json.loads((root / "metrics/evaluate.json").read_text())["accuracy"]
    assert "parity_max_abs_diff" in cand.tags

    result = _stage(root, env, "stages.promote")
    assert result.returncode == 0, result.stderr
    assert client.get_model_version_by_alias(name, "champion").version == cand.version

    worse = client.create_model_version(name, cand.source, cand.run_id, tags={"eval_accuracy": str(acc - 0.01)})
    result = _stage(root, env, "stages.promote", "--version", str(worse.version))
    assert result.returncode != 0 and "refused" in result.stdout + result.stderr
    assert client.get_model_version_by_alias(name, "champion").version == cand.version

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    images, labels = test_split
    x = (images[:200].astype(np.float32) / 255)[:, None]
    out = model.predict(x)  # the ONNX flavour answers {output name: array} for an array input
    logits = np.asarray(out["logits"] if isinstance(out, dict) else out)
    assert (logits.argmax(1) == labels[:200]).mean() > 0.5

    result = _stage(root, env, "stages.compare", "--last", "3")
    assert result.returncode == 0, result.stderr
    assert "test acc" in result.stdout and cand.run_id[:8] in result.stdout
