"""The whole DVC pipeline, end to end, on a small subset in a temporary copy of the repository."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import LOCAL_MIRROR, SMALL, small_repo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

def dvc(repo: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    if args[:2] == ("exp", "run"):  # each experiment starts from the committed params
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=repo, check=True)
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mirror, web_mirror):
    root = small_repo(tmp_path_factory.mktemp("repo"))
    env = {**os.environ, "MNIST_MIRROR": str(mirror), "ONNXRUNTIME_WEB_MIRROR": str(web_mirror),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env.pop("DVC_EXP_NAME", None)
    result = dvc(root, "repro", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, env, result.stdout


def test_repro_runs_every_stage_and_writes_the_outs(repo, web_mirror):
    from pipeline import headline

    root, _, out = repo
    for stage in ("download", "train", "export", "verify", "evaluate", "triton", "benchmark", "quantize", "summary",
                  "card", "web"):
        assert f"Running stage '{stage}'" in out
    train = json.loads((root / "reports/train.json").read_text())
    assert train["params"] == (5 * 5 * 1 + 1) * 8 + (5 * 5 * 8 + 1) * 16 + (784 + 1) * 64 + (64 + 1) * 10
    assert train["images_per_s"] > 0 and train["peak_rss_mb"] > 0 and train["train_images"] == SMALL["train"]["subset"]
    export = json.loads((root / "reports/export.json").read_text())
    assert export["parity_argmax_agreement"] == 1.0
    evaluation = json.loads((root / "reports/evaluate.json").read_text())
    assert evaluation["images"] == 10_000 and evaluation["accuracy"] > 0.5  # chance is 0.1; 40 steps of a tiny net
    assert len((root / "plots/confusion.csv").read_text().splitlines()) == 10_001
    assert (root / "plots/misclassified.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "models/model.onnx").stat().st_size > 100_000
    shapes = json.loads((root / "reports/verify.json").read_text())
    assert shapes["verify_ok"] and shapes["params_onnx"] == train["params"]
    assert "| conv2 | Conv | N x 16 x 14 x 14 | batch x 16 x 14 x 14 | N x 16 x 14 x 14 |" in (
        root / "reports/shapes.md").read_text()
    bench = json.loads((root / "reports/benchmark.json").read_text())
    cuda = {("onnxruntime-cuda", "fp32", b) for b in (1, 16)} if bench["status"]["cuda_status"] == "ran" else set()
    assert {(r["path"], r["precision"], r["batch"]) for r in bench["rows"]} == {
        (p, q, b) for p, q in [("onnxruntime-cpu", "fp32"), ("onnxruntime-cpu", "int8"), ("pytorch-cpu", "fp32")]
        for b in (1, 16)} | cuda
    assert {r["kind"] for r in bench["ratios"]} >= {"latency", "throughput", "int8"} and bench["hardware"]["cores"]
    assert "cpu_features" in bench["hardware"]
    throughput = (root / "plots/throughput.csv").read_text().splitlines()
    assert throughput[0] == "batch,onnxruntime-cpu_fp32,onnxruntime-cpu_int8,pytorch-cpu_fp32" and len(throughput) == 3
    for picture in ("conv1_filters", "feature_maps", "confusion", "benchmark"):
        assert (root / f"plots/{picture}.png").read_bytes()[:4] == b"\x89PNG"
    triton = root / "models/triton/mnist-cnn-onnx"
    assert (triton / "1/model.onnx").read_bytes() == (root / "models/model.onnx").read_bytes()
    assert 'backend: "onnxruntime"' in (triton / "config.pbtxt").read_text()
    # the headline: every metric of pipeline/headline.py, with the stage reports' numbers
    values = {row: json.loads((root / f"metrics/{row}.json").read_text()) for row in headline.ROWS}
    assert {(row, k) for row, keys in values.items() for k in keys} == {(m.row, m.key) for m in headline.HEADLINE}
    assert values["fp32"]["accuracy"] == round(evaluation["accuracy"], 4)
    assert values["fp32"]["params"] == shapes["params_onnx"] and values["train"]["img_per_s"] == round(
        train["images_per_s"])
    assert all(line in out for line in headline.summary(values))  # the summary stage says it too
    site = root / "models/web"  # the static site, offline: onnxruntime-web from the mirror, verified
    assert f"from {web_mirror / 'onnxruntime-web-1.30.0.tgz'}, integrity verified" in out
    assert (site / "model.onnx").read_bytes() == (root / "models/model.onnx").read_bytes()
    assert {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()} == {
        "index.html", "app.js", "runtimes.js", "digits.js", "site.json", "model.onnx",
        "ort/ort.wasm.bundle.min.mjs", "ort/ort-wasm-simd-threaded.wasm"}


def test_the_model_files_say_where_they_came_from(repo, tmp_path):
    """Provenance and the input contract inside model.onnx, its INT8 twin and the Triton copy;
    a second export of the same weights gives the same bytes."""
    import onnx

    from pipeline import runtime
    from tracking.provenance import params_md5

    root, env, _ = repo
    model = onnx.load(root / "models/model.onnx")
    meta = runtime.metadata(model)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert (meta["git_commit"], meta["git_dirty"]) == (head, "False")  # the pipeline's own outputs don't count
    assert meta["mlflow_run_id"] == (root / "models/mlflow_run_id").read_text().strip()
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    [raw] = [o for o in lock["stages"]["download"]["outs"] if o["path"] == "data/raw"]
    assert meta["data_md5"] == raw["md5"]  # DVC's own hash of the data the model was trained on
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert meta["params_md5"] == params_md5({k: params[k] for k in ("model", "train")})
    assert meta["training_device"] == "cpu" and meta["torch_version"] and meta["onnx_version"] == onnx.__version__
    assert (meta["input_layout"], meta["input_shape"], meta["labels"]) == ("NCHW", "N,1,28,28", "0,1,2,3,4,5,6,7,8,9")
    assert model.producer_name == "mnist-onnx"
    int8 = onnx.load(root / "models/model.int8.onnx")
    assert runtime.metadata(int8) == meta and int8.producer_name == "mnist-onnx"
    triton = root / "models/triton/mnist-cnn-onnx/1/model.onnx"
    assert runtime.metadata(onnx.load(triton)) == meta

    again = tmp_path / "model.onnx"  # the same stage again, on its own MLflow store
    result = _stage(root, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                           "MLFLOW_SPOOL_DIR": str(tmp_path / "spool")},
                    "stages.export", "--weights", "models/model.pt", "--data", "data/raw",
                    "--run-id", "models/mlflow_run_id", "--train-metrics", "reports/train.json",
                    "--out", str(again), "--metrics", str(tmp_path / "export.json"))
    assert result.returncode == 0, result.stderr
    assert again.read_bytes() == (root / "models/model.onnx").read_bytes()


def test_the_model_card_says_what_the_metrics_say(repo):
    import csv

    from pipeline import runtime

    root, _, _ = repo
    page = (root / "reports/model_card.md").read_text()
    evaluation = json.loads((root / "reports/evaluate.json").read_text())
    quantized = json.loads((root / "reports/quantize.json").read_text())
    assert f"**{evaluation['accuracy']:.2%}** ({evaluation['errors']} errors in 10,000)" in page
    assert f"{quantized['int8']['accuracy']:.2%}, {quantized['int8_accuracy_delta'] * 100:+.2f} points" in page
    assert "conv 5x5x8 -> max pool 2x2 -> conv 5x5x16 -> max pool 2x2 -> fc 64 -> dropout 0.5 -> fc 10" in page
    assert f"{SMALL['train']['subset']:,} of the 60,000 training images" in page
    rows = list(csv.DictReader((root / "plots/confusion.csv").open()))
    sevens = [r for r in rows if r["actual"] == "7"]
    right = sum(r["predicted"] == "7" for r in sevens) / len(sevens)
    assert f"| 7 | {len(sevens):,} | {right:.2%} |" in page
    meta = runtime.metadata(runtime.load_checked(root / "models/model.onnx"))
    assert runtime.sha256(root / "models/model.onnx") in page and meta["data_md5"] in page
    for picture in ("../plots/confusion.png", "../plots/misclassified.png"):  # links that resolve
        assert f"]({picture})" in page and (root / "reports" / picture).resolve().is_file()


def test_one_identity_from_registry_to_predict_info_and_the_service(repo, monkeypatch):
    import urllib.request

    import mlflow

    from harness.services import SpawnedServer
    from pipeline import runtime

    root, env, _ = repo
    model = root / "models/model.onnx"
    sha256 = runtime.sha256(model)
    run_id = (root / "models/mlflow_run_id").read_text().strip()
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    [version] = client.search_model_versions(f"run_id = '{run_id}'")
    assert version.tags["sha256"] == sha256  # the registry names the file by its bytes

    info = _stage(root, env, "commands.predict", "--info", "--json")
    assert info.returncode == 0, info.stderr
    about = json.loads(info.stdout)
    meta = runtime.metadata(runtime.load_checked(model))
    assert about["sha256"] == sha256 and about["registry_version"] == str(version.version)
    assert {k: about[k] for k in meta} == meta

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    with SpawnedServer(model) as server:
        with urllib.request.urlopen(f"{server.url}/v2/models/mnist-cnn-onnx", timeout=30) as r:
            parameters = json.loads(r.read())["parameters"]
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text().lower()
    assert "onnxruntime" in maps and "_sqlite3" not in maps  # the store was read by a child process
    assert parameters["sha256"] == sha256 and parameters["registry_version"] == str(version.version)
    assert parameters["git_commit"] == meta["git_commit"] and parameters["mlflow_run_id"] == run_id


def test_second_repro_runs_nothing(repo):
    root, env, _ = repo
    lock = (root / "dvc.lock").read_bytes()
    result = dvc(root, "repro", env=env)
    assert result.returncode == 0
    assert "Running stage" not in result.stdout
    assert (root / "dvc.lock").read_bytes() == lock


def test_mlflow_run_holds_params_metrics_and_model(repo):
    import mlflow

    from pipeline import headline

    root, env, _ = repo
    run_id = (root / "models/mlflow_run_id").read_text().strip()
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    assert run.info.run_name == f"at {head.stdout.strip()}"  # no experiment, no changed param: the commit
    assert run.info.status == "FINISHED"
    assert {"train.epochs", "model.channels", "train.lr"} <= set(run.data.params)
    assert {m.name for m in headline.HEADLINE} <= set(run.data.metrics)
    assert {"loss", "test_acc", "accuracy", "parity_max_abs_diff"} <= set(run.data.metrics)
    assert len(run.data.metrics) < 60 and not any(k.startswith(("bench_", "machine_")) for k in run.data.metrics)
    assert len(run.data.tags["git_commit"]) == 40


def _rest(base: str, path: str, body: dict | None = None) -> dict:
    import urllib.request
    request = urllib.request.Request(base + path, json.dumps(body).encode() if body is not None else None,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


ARCHITECTURES = {  # experiment name: (-S overrides, conv2's row in the shape report)
    "arch-wide": (["model.channels=[16,32]", "model.fc_units=256", "train.epochs=2"], "N x 32 x 14 x 14"),
    "arch-valid": (["model.padding=valid", "train.seed=1"], "N x 16 x 8 x 8"),  # 28 -> 24 -> 12 -> 8 (-> 4)
}


def exp_ref(root: Path, name: str) -> str:
    """The git ref of a DVC experiment (refs/exps/.../<name>): its commit holds the experiment's outputs."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=root, capture_output=True,
                          text=True, check=True).stdout.split()
    [ref] = [r for r in refs if r.endswith(f"/{name}")]
    return ref


def test_parallel_queued_experiments_then_rest_api_and_dashboard(repo, browser, tmp_path):
    """Two other architectures, queued with `dvc exp run -S` and run two at a time against
    the embedded sqlite store: each trains, exports and verifies, `dvc exp show` lists them,
    and `mlflow server` on 127.0.0.1 shows both runs complete, through its REST API and UI."""
    from urllib.parse import quote

    from selenium.webdriver.support.ui import WebDriverWait

    from harness.services import free_port, mlflow_server
    from pipeline import headline
    from tracking import datasets

    root, env, _ = repo
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    [raw_md5] = [o["md5"] for o in lock["stages"]["download"]["outs"] if o["path"] == "data/raw"]
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=root, check=True)
    for name, (overrides, _) in ARCHITECTURES.items():
        args = [a for o in overrides for a in ("-S", o)]
        result = dvc(root, "exp", "run", "--queue", "-n", name, *args, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    result = dvc(root, "exp", "run", "--run-all", "--jobs", "2", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not list((root / ".mlflow-spool").glob("*.jsonl"))  # sqlite coped: nothing waits for replay
    shown = json.loads(dvc(root, "exp", "show", "--json", env=env).stdout)
    text = json.dumps(shown)
    assert all(name in text for name in ARCHITECTURES) and '"epochs": 2' in text.replace("'", '"')
    exps = {name: {row: json.loads(subprocess.run(["git", "show", f"{exp_ref(root, name)}:metrics/{row}.json"],
                                                  cwd=root, capture_output=True, text=True, check=True).stdout)
                   for row in headline.ROWS} for name in ARCHITECTURES}

    # dvc exp show: every headline column for both, and, 120 columns wide, their accuracy uncut
    import csv
    table = list(csv.DictReader(dvc(root, "exp", "show", "--csv", env=env).stdout.splitlines()))
    for name, values in exps.items():
        [line] = [r for r in table if r["Experiment"] == name]
        for m in headline.HEADLINE:
            cell = line.get(f"metrics/{m.row}.json:{m.key}", line.get(m.key))
            assert cell is not None and cell != "", (name, m.name)
        assert float(line["metrics/fp32.json:accuracy"]) == values["fp32"]["accuracy"]
    narrow = dvc(root, "exp", "show", env={**env, "COLUMNS": "120"})
    for name, values in exps.items():
        [line] = [x for x in narrow.stdout.splitlines() if name in x]
        assert str(values["fp32"]["accuracy"]) in line.split(), line
    shown_metrics = dvc(root, "metrics", "show", env=env).stdout
    assert max(len(x) for x in shown_metrics.splitlines()) <= 100, shown_metrics

    # the model card of an experiment describes the network it trained, on the images it used
    card = subprocess.run(["git", "show", f"{exp_ref(root, 'arch-wide')}:reports/model_card.md"], cwd=root,
                          capture_output=True, text=True, check=True).stdout
    assert "conv 5x5x16 -> max pool 2x2 -> conv 5x5x32 -> max pool 2x2 -> fc 256 -> dropout 0.5 -> fc 10" in card
    assert f"{SMALL['train']['subset']:,} of the 60,000 training images" in card

    # the comparison report: every number is the metrics files' own
    out = tmp_path / "report"
    result = _stage(root, env, "commands.compare", *ARCHITECTURES, "--out", str(out / "report.md"), "--html", str(out))
    assert result.returncode == 0, result.stderr
    report_md = (out / "report.md").read_text()
    assert "| `model.fc_units` | 256 | 64 |" in report_md and "| `model.padding` | same | valid |" in report_md
    a, b = ARCHITECTURES
    for m in headline.HEADLINE:
        row = next(x for x in report_md.splitlines() if x.startswith(f"| {m.row} {m.key}: "))
        cells = [c.strip() for c in row.split("|")[2:4]]
        assert cells == [m.show(exps[a][m.row].get(m.key)), m.show(exps[b][m.row].get(m.key))], (m.name, row)

    # dvc plots diff, as the report draws it: both experiments in the training curve
    page = out / "plots" / "index.html"
    assert page.is_file() and all(name in page.read_text() for name in ARCHITECTURES)
    browser.set_window_size(1400, 2400)
    browser.get(page.as_uri())
    from selenium.webdriver.support.ui import WebDriverWait as Wait
    Wait(browser, 60).until(lambda d: len(d.find_elements("css selector", "canvas, svg")) >= 4)
    time.sleep(2)
    browser.save_screenshot(str(tmp_path / "dvc-plots-diff.png"))
    legend = browser.find_element("tag name", "body").text
    assert all(name in legend for name in ARCHITECTURES), legend[:2000]
    if os.environ.get("SCREENSHOT_DIR"):
        import shutil
        shutil.copy(tmp_path / "dvc-plots-diff.png", os.environ["SCREENSHOT_DIR"])

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with mlflow_server(root / "mlflow.db", port):
        exp = _rest(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=mnist-onnx")["experiment"]
        runs = _rest(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                           "max_results": 100})["runs"]
        by_name = {r["info"]["run_name"]: r for r in runs}
        assert set(ARCHITECTURES) <= set(by_name)
        assert len(by_name) == len(runs)  # one run per training run: the repro's and the two experiments'
        for name, (overrides, conv2) in ARCHITECTURES.items():
            run = by_name[name]
            run_id = run["info"]["run_id"]
            metrics = {m["key"] for m in run["data"]["metrics"]}
            assert {"loss", "test_acc", "images_per_s", "parity_max_abs_diff", "verify_ok", "accuracy",
                    *(m.name for m in headline.HEADLINE)} <= metrics, name
            assert len(metrics) < 60, sorted(metrics)  # the headline and the curves, not a table per metric
            assert run["info"]["status"] == "FINISHED"
            inputs = {d["dataset"]["name"]: d for d in run["inputs"]["dataset_inputs"]}
            assert set(inputs) == {"mnist-train", "mnist-test"}
            digests = {n: inputs[n]["dataset"]["digest"] for n in inputs}
            assert digests == {n: datasets.mnist(n.split("-")[1], raw_md5).digest for n in digests}
            assert all(raw_md5.removesuffix(".dir")[:24] in d for d in digests.values())  # DVC's hash of data/raw
            test_digest = digests["mnist-test"]
            assert {n: inputs[n]["tags"][0]["value"] for n in inputs} == {"mnist-train": "training",
                                                                           "mnist-test": "evaluation"}
            models = _rest(base, "/api/2.0/mlflow/logged-models/search", {
                "experiment_ids": [exp["experiment_id"]], "filter": f"source_run_id = '{run_id}'"})["models"]
            accuracy = {m["info"]["name"]: [x for x in m["data"]["metrics"] if x["key"] == "accuracy"] for m in models}
            assert set(accuracy) == {"fp32", "int8"}
            for model, points in accuracy.items():  # each model's accuracy, measured on the test set
                assert points and all(p["dataset_name"] == "mnist-test" and p["dataset_digest"] == test_digest
                                      and round(p["value"], 4) == exps[name][model]["accuracy"] for p in points), points
            history = _rest(base, f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=test_acc")
            assert len(history["metrics"]) == (2 if "train.epochs=2" in overrides else SMALL["train"]["epochs"])
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            assert all(params[o.split("=")[0]] == o.split("=")[1].replace(",", ", ") for o in overrides), params
            assert next(m["value"] for m in run["data"]["metrics"] if m["key"] == "verify_ok") == 1.0
            import urllib.request
            with urllib.request.urlopen(f"{base}/get-artifact?path=verify/shapes.md&run_uuid={run_id}") as r:
                assert f"| conv2 | Conv | {conv2} |" in r.read().decode()  # verified, not assumed
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            assert tags["dvc_exp_name"] == name and {"git_commit", "git_dirty", "torch", "onnxruntime",
                                                     "device"} <= set(tags)
            listed = set()
            for folder in ("verify", "evaluate", "benchmark", "dvc"):
                files = _rest(base, f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path={folder}").get("files", [])
                listed |= {f["path"] for f in files}
            assert {"verify/shapes.md", "evaluate/confusion.png", "evaluate/misclassified.png",
                    "benchmark/benchmark.png", "benchmark/benchmark.json", "benchmark/benchmark.csv",
                    "dvc/dvc.lock"} <= listed, listed  # the benchmark table is an artifact
        alias = _rest(base, "/api/2.0/mlflow/registered-models/alias?name=mnist-cnn-onnx&alias=candidate")
        newest = max(by_name.values(), key=lambda r: int(r["info"]["start_time"]))
        version = alias["model_version"]
        assert version["aliases"] == ["candidate"] or "candidate" in version.get("aliases", [])
        assert version["run_id"] in {by_name[n]["info"]["run_id"] for n in ARCHITECTURES}
        assert {t["key"] for t in version["tags"]} >= {"eval_accuracy", "parity_max_abs_diff", "sha256"}
        assert newest["info"]["run_id"]  # both ran; the alias is on one of them (the last to export)

        ids = [by_name[n]["info"]["run_id"] for n in ARCHITECTURES]
        url = (f"{base}/#/compare-runs?runs={quote(json.dumps(ids))}"
               f"&experiments={quote(json.dumps([exp['experiment_id']]))}")
        browser.set_window_size(1400, 1500)
        browser.get(url)
        WebDriverWait(browser, 90).until(
            lambda d: all(n in d.find_element("tag name", "body").text for n in ARCHITECTURES))
        time.sleep(2)  # let the charts finish drawing
        # the comparison's metrics table in view, the sections above it folded: the headline side by side
        for title in ("Visualizations", "Run details", "Parameters"):
            browser.find_element("xpath", f"//*[normalize-space(text())='{title}']").click()
            time.sleep(0.5)
        shown = browser.find_element("tag name", "body").text
        assert all(name in shown for name in ("fp32_accuracy", "fp32_img_per_s", "fp32_latency")), shown[-3000:]
        shot = tmp_path / "mlflow-compare-runs.png"
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:4] == b"\x89PNG"
        if os.environ.get("SCREENSHOT_DIR"):  # keep it where a person can look at it
            import shutil
            shutil.copy(shot, os.environ["SCREENSHOT_DIR"])


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
    assert acc == client.get_run(cand.run_id).data.metrics["fp32_accuracy"]  # the evaluate stage's number
    assert "parity_max_abs_diff" in cand.tags
    # the first repro's version is champion from then on (docs/deploy.md serves models:/...@champion)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    result = _stage(root, env, "commands.promote")
    assert result.returncode == 0, result.stderr
    assert client.get_model_version_by_alias(name, "champion").version == cand.version

    worse = client.create_model_version(name, cand.source, cand.run_id, tags={"eval_accuracy": str(acc - 0.01)})
    result = _stage(root, env, "commands.promote", "--version", str(worse.version))
    assert result.returncode != 0 and "refused" in result.stdout + result.stderr
    assert client.get_model_version_by_alias(name, "champion").version == cand.version

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    images, labels = test_split
    x = (images[:200].astype(np.float32) / 255)[:, None]
    out = model.predict(x)  # the ONNX flavour answers {output name: array} for an array input
    logits = np.asarray(out["logits"] if isinstance(out, dict) else out)
    assert (logits.argmax(1) == labels[:200]).mean() > 0.5

    result = _stage(root, env, "commands.compare", "--last", "3")
    assert result.returncode == 0, result.stderr
    head, *lines = result.stdout.splitlines()
    assert head.split()[0] == "run" and "fp32_accuracy" in head.split() and lines  # after the params that differ
    newest = client.get_run(cand.run_id)
    assert f"{newest.data.metrics['fp32_accuracy']:.2%}" in result.stdout  # the onnxruntime column is filled
    assert "fp32_latency" in head and f"{newest.data.metrics['fp32_latency']:.3f}x" in result.stdout


def test_an_experiment_on_two_processes_just_works(repo):
    """`dvc exp run -S train.processes=2`: the stage starts torchrun itself; one MLflow run."""
    root, env, _ = repo
    result = dvc(root, "exp", "run", "-n", "two-procs", "-S", "train.processes=2", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting 2 processes with torchrun" in result.stdout and "x 2 processes" in result.stdout
    db = sqlite3.connect(root / "mlflow.db")
    runs = db.execute("select run_uuid from runs where name = 'two-procs'").fetchall()
    assert len(runs) == 1
    params = dict(db.execute("select key, value from params where run_uuid=?", runs[0]))
    assert params["train.processes"] == "2" and params["train.world_size"] == "2"
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=root, check=True)
