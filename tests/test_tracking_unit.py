"""The tracking package on its own: a sqlite store in a temporary folder, and a dead one.

(tests/test_tracking.py drives the train stage against a real `mlflow server`; these test
the pieces: operations, the spool and its replay, the tracker's offline switch.)
"""
from __future__ import annotations

import json
import stat
import time

import pytest

from harness.services import free_port
from tracking import ops, spool, store
from tracking.run import Tracker, note_opened_run, opened_run

pytestmark = pytest.mark.integration  # MLflow in this process, on a sqlite store: it runs git and alembic


@pytest.fixture
def sqlite(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_SPOOL_DIR", str(tmp_path / "spool"))
    return uri


@pytest.fixture
def dead(tmp_path, monkeypatch):
    """A tracking URI where nothing listens (a port taken, then freed)."""
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    return f"http://127.0.0.1:{port}"


def history(key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in store.client().get_metric_history(tracker_id(key), "loss"))


def tracker_id(key: str) -> str:
    return spool.ids().get(key, key)


def test_a_run_gets_params_metrics_and_tags(sqlite):
    t = Tracker.start("exp-1", {"train.lr": 0.004}, {"git_commit": "abc"})
    t.log_metrics({"loss": 0.5, "ok": True, "name": "not a number"}, step=1)
    run = store.client().get_run(t.run_id)
    assert run.info.run_name == "exp-1" and run.data.params == {"train.lr": "0.004"}
    assert run.data.tags["git_commit"] == "abc"
    assert run.data.metrics == {"loss": 0.5, "ok": 1.0}  # a bool is 1.0; a string is not a metric


def test_compare_finds_runs_by_id_or_by_name_the_newest_first(sqlite):
    """`python -m commands.compare --runs A B`: MLflow's filters have no OR, so the one search
    for "id or name" it made was refused (MlflowException: Invalid clause(s) ... 'OR')."""
    from commands import compare
    first = Tracker.start("arch-wide", {}, {})
    first.log_metrics({"fp32_accuracy": 0.97})
    newer = Tracker.start("arch-wide", {}, {})
    newer.log_metrics({"fp32_accuracy": 0.98})
    other = Tracker.start("arch-valid", {}, {})
    found = compare.runs(store.client(), [other.run_id, "arch-wide"])
    assert [r.info.run_id for r in found] == [other.run_id, newer.run_id]
    assert compare.of_run(found[1]).values == {"fp32": {"accuracy": 0.98}}
    with pytest.raises(SystemExit, match="no run 'nowhere'"):
        compare.runs(store.client(), ["nowhere"])


def test_the_tracker_counts_the_time_its_caller_spent_logging(sqlite, monkeypatch):
    assert Tracker(None).seconds == 0.0
    t = Tracker.start("timed", {"a": 1}, {})
    after_start = t.seconds
    assert after_start > 0  # creating the run and logging its params took time

    def slow_apply(op: dict, run_id: str | None) -> str | None:
        time.sleep(0.2)
        return run_id

    monkeypatch.setattr(ops, "apply", slow_apply)
    t.log_metrics({"loss": 0.5}, step=1)
    assert 0.2 <= t.seconds - after_start < 1.0  # the call's own time, counted once


def test_a_dead_store_spools_everything_in_order_and_replay_restores_it(dead, tmp_path, monkeypatch):
    t = Tracker.start(None, {"a": 1}, {})
    assert t.key.startswith(spool.PENDING) and t.run_id is None and t.connection.offline
    for step in (1, 2, 3):
        t.log_metrics({"loss": 1.0 / step}, step=step)
    artifact = tmp_path / "report.md"
    artifact.write_text("v1")
    t.log_artifact(artifact, "verify")
    artifact.write_text("v2, changed after logging")  # the spool kept the bytes as logged
    lines = (store.spool_dir() / f"{t.key}.jsonl").read_text().splitlines()
    assert [json.loads(line)["op"] for line in lines] == ["create_run", "log_batch", "log_batch", "log_batch",
                                                           "log_batch", "log_artifact"]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # the store is back
    done, complete = spool.replay(log=lambda line: None)
    assert complete and done == {t.key: 6} and spool.pending_keys() == []
    run_id = spool.ids()[t.key]
    assert Tracker(t.key).run_id == run_id  # the pending key now names the real run
    assert history(t.key) == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    local = store.client().download_artifacts(run_id, "verify/report.md", str(tmp_path / "dl"))
    assert open(local).read() == "v1"
    assert not (store.spool_dir() / "files").exists() or not any((store.spool_dir() / "files").iterdir())


def test_after_one_failure_a_tracker_stops_calling_mlflow(dead, monkeypatch):
    t = Tracker.start(None, {}, {})
    calls = []
    monkeypatch.setattr(ops, "apply", lambda op, run_id: calls.append(op))
    t.log_metrics({"loss": 1.0}, step=1)
    assert calls == []  # spooled at once: a dead server costs one timeout, not one per call
    fresh = Tracker(t.key)  # another stage's tracker has its own connection ...
    assert not fresh.connection.offline  # ... no process-wide switch left behind


def test_a_replay_that_fails_midway_applies_nothing_twice(sqlite, monkeypatch):
    t = Tracker.start(None, {}, {})
    t.connection.offline = True  # as after a failure: everything goes to the spool
    for step in (1, 2, 3):
        t.log_metrics({"loss": float(step)}, step=step)
    real_apply, seen = ops.apply, []

    def flaky(op, run_id):
        seen.append(op)
        if len(seen) == 2:
            raise ConnectionError("store went away")
        return real_apply(op, run_id)
    monkeypatch.setattr(ops, "apply", flaky)
    done, complete = spool.replay(log=lambda line: None)
    assert not complete and done == {t.key: 1}
    monkeypatch.setattr(ops, "apply", real_apply)
    assert spool.replay(log=lambda line: None) == ({t.key: 2}, True)
    assert history(t.key) == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_no_tracking_without_a_run_id(tmp_path, sqlite):
    t = Tracker.resume(tmp_path / "absent")
    assert t.key is None
    t.log_metrics({"loss": 1.0})  # nothing happens, nothing fails
    assert spool.pending_keys() == []


def test_the_spool_and_the_run_note_are_readable_files(sqlite, tmp_path):
    note = tmp_path / "train.ckpt.run"
    note_opened_run(note, "fp", "run-1")
    assert opened_run(note, "fp") == "run-1"
    assert opened_run(note, "another run's fingerprint") is None
    note.write_text("{not json")
    assert opened_run(note, "fp") is None
    assert stat.S_IMODE(note.stat().st_mode) & 0o044  # written through pipeline.atomic: not 0600


def test_unknown_operations_are_refused():
    with pytest.raises(ValueError, match="unknown tracking operation 'drop_table'"):
        ops.apply({"op": "drop_table"}, "run")


def test_the_logged_model_asks_for_the_gpu_first_and_serves_on_what_there_is(sqlite, tmp_path):
    """The registered model's pyfunc: CUDA first, then CPU, in its MLmodel, and loaded by
    mlflow.pyfunc it runs (on the CPU here) and answers like the file itself."""
    import mlflow
    import numpy as np
    import torch

    from pipeline import export, runtime
    from pipeline.model import ModelConfig, Net
    from tracking import registry
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    export.export_onnx(Net(ModelConfig(channels=(4, 8), fc_units=16)).eval(), path, export.ExportConfig())
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    y = runtime.open_session(runtime.load_checked(path)).run(x)
    t = Tracker.start(None, {}, {})
    t.log_onnx_model(path, x, y, registered_name="unit-test-model")
    version = store.client().get_model_version_by_alias("unit-test-model", registry.CANDIDATE)
    model = mlflow.pyfunc.load_model(f"models:/unit-test-model/{version.version}")
    assert model.metadata.flavors["onnx"]["providers"] == registry.PYFUNC_PROVIDERS
    wrapper = model._model_impl
    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in runtime.ort.get_available_providers() \
        and torch.cuda.is_available() else "CPUExecutionProvider"
    assert wrapper.rt.get_providers()[0] == expected
    np.testing.assert_allclose(model.predict(x)["logits"], y, rtol=1e-5, atol=1e-6)


def test_the_spool_replays_datasets_models_their_metrics_a_new_name_and_the_end(dead, tmp_path, monkeypatch):
    """What the stages log for MLflow 3's model view, logged while the store is down: replay
    makes the run with its two datasets, a model of its own, that model's metrics on the test
    set, the name of the experiment that finished it, and FINISHED."""
    import numpy as np
    import torch

    from pipeline import export, runtime
    from pipeline.model import ModelConfig, Net
    from tracking import datasets, registry
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    export.export_onnx(Net(ModelConfig(channels=(4, 8), fc_units=16)).eval(), path, export.ExportConfig())
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    md5 = "0123456789abcdef0123456789abcdef.dir"
    test_set = datasets.mnist("test", md5)

    t = Tracker.start("first-attempt", {}, {})
    t.log_inputs([(datasets.mnist(split, md5), context) for split, context in datasets.CONTEXTS.items()])
    t.log_onnx_model(path, x, runtime.open_session(runtime.load_checked(path)).run(x), name="int8")
    t.log_metrics({"accuracy": 0.97, "errors": 300}, model="int8", dataset=test_set)
    t.rename("exp-that-finished-it")
    t.finish()
    ops_spooled = [json.loads(line)["op"] for line in (store.spool_dir() / f"{t.key}.jsonl").read_text().splitlines()]
    assert ops_spooled == ["create_run", "log_inputs", "log_onnx_model", "log_batch", "rename_run",
                           "end_run"]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # the store is back
    done, complete = spool.replay(log=lambda line: None)
    assert complete
    client = store.client()
    run = client.get_run(spool.ids()[t.key])
    assert run.info.run_name == "exp-that-finished-it" and run.info.status == "FINISHED"
    inputs = {d.dataset.name: (d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert inputs == {"mnist-train": ("0123456789abcdef01234567-train", "training"),
                      "mnist-test": ("0123456789abcdef01234567-test", "evaluation")}
    model = client.get_logged_model(registry.logged_model_id(client, run.info.run_id, "int8"))
    metrics = {m.key: (m.value, m.dataset_name, m.dataset_digest) for m in model.metrics}
    digest = test_set.digest
    assert metrics == {"accuracy": (0.97, "mnist-test", digest), "errors": (300.0, "mnist-test", digest)}


def _evaluated_version(name: str, accuracy: float | None) -> Tracker:
    """A run with a registered version of ``name`` (no model file: the registry rule needs none),
    tagged as the evaluate stage tags it."""
    t = Tracker.start(None, {}, {})
    client = store.client()
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    client.create_model_version(name, f"runs:/{t.run_id}/onnx-model", t.run_id)
    if accuracy is not None:
        t.tag_model_versions({"eval_accuracy": accuracy})
    return t


def test_the_first_evaluated_version_becomes_champion_and_later_ones_only_by_promote(sqlite):
    """After a fresh dvc repro, models:/<name>@champion existed only once someone ran
    commands.promote. Now the evaluate stage makes the first version champion, by promote's rule
    (an evaluated version, not less accurate than the champion); later ones only by hand."""
    from tracking import registry
    client = store.client()
    unevaluated = _evaluated_version("m", None)
    unevaluated.champion_if_none()  # no eval_accuracy: not promotable, and the stage is not failed for it
    assert registry.champion_of(client, "m") is None
    _evaluated_version("m", 0.95).champion_if_none()
    assert str(registry.champion_of(client, "m").version) == "2"
    _evaluated_version("m", 0.99).champion_if_none()  # better, but there is a champion: promote decides
    assert str(registry.champion_of(client, "m").version) == "2"
    assert "m@champion -> version 3" in registry.promote(client, "m", client.get_model_version("m", "3"))
    _evaluated_version("m", 0.90)
    with pytest.raises(registry.PromotionRefused, match="version 4 has test accuracy 0.9000, worse than the "
                                                        r"champion \(version 3, 0.9900\)"):
        registry.promote(client, "m", client.get_model_version("m", "4"))
    assert str(registry.champion_of(client, "m").version) == "3"


@pytest.mark.integration
def test_the_documented_mlflow_serving_command_serves_the_champion_without_the_virtualenv(sqlite, tmp_path,
                                                                                           test_split):
    """docs/deploy.md's ./scripts/mlflow_serve.sh, as written, with a PATH that does not hold
    the virtualenv (MLflow starts `uvicorn` from PATH: the bare command died "uvicorn: not found"),
    serving models:/mnist-cnn-onnx@champion, which the first evaluated version became."""
    import os
    import signal
    import subprocess
    import urllib.request

    import numpy as np
    import torch

    from harness.services import REPO, wait_until_answers
    from pipeline import contract, export, runtime
    from pipeline.model import ModelConfig, Net
    from tracking import registry
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    export.export_onnx(Net(ModelConfig(channels=(4, 8), fc_units=16)).eval(), path, export.ExportConfig())
    x = contract.to_input(test_split[0][:5])
    y = runtime.open_session(runtime.load_checked(path)).run(x)
    t = Tracker.start(None, {}, {})
    t.log_onnx_model(path, x[:2], y[:2], registered_name="mnist-cnn-onnx")
    t.tag_model_versions({"eval_accuracy": 0.5})
    t.champion_if_none()  # what the evaluate stage does
    assert str(registry.champion_of(store.client(), "mnist-cnn-onnx").version) == "1"

    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": sqlite, "PORT": str(port)}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(REPO / "scripts/mlflow_serve.sh")], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/ping", proc, 180, (tmp_path / "serve.log").read_text)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         json.dumps({"inputs": x.tolist()}).encode(),
                                         {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        np.testing.assert_allclose(np.array(answer["predictions"]["logits"]), y, rtol=1e-4, atol=1e-5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
