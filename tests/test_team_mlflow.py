"""The team's MLflow server, for real: PostgreSQL, `mlflow server` with proxied artifacts and
logins (python -m tracking.server, through scripts/mlflow_server.sh), on 127.0.0.1.

The whole pipeline logs there as it does to sqlite; a teammate elsewhere gets the champion's
bytes through the server alone; the spool survives the server and the database going away;
logins keep readers from writing. What MLflow's basic-auth lets a default (READ) user do,
statement by statement as docs/team.md says it; and what PostgreSQL keeps from MLflow's role
and from its own account (the admin password, the server's files, statement values in its log).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from harness.services import TeamServer
from tests.conftest import small_repo
from tests.test_pipeline_e2e import dvc
from tests.test_tracking import assert_run_holds_everything_logged, sync, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODEL, EXPERIMENT = "mnist-cnn-onnx", "mnist-onnx"


@pytest.fixture(scope="module", autouse=True)
def _postgresql_installed():
    from tracking.server import ServerError, postgres_bin
    try:
        postgres_bin("initdb")
    except ServerError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def server():
    with TeamServer() as s:
        yield s


@pytest.fixture(scope="module")
def repo(server, tmp_path_factory, mirror):
    """A clone of the project with small params; its `dvc repro` logs to the team server."""
    root = small_repo(tmp_path_factory.mktemp("team-repo"))
    env = {**os.environ, **server.admin_env, "MNIST_MIRROR": str(mirror),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DVC_EXP_NAME", None)
    result = dvc(root, "repro", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, env, result.stdout + result.stderr


def client(server: TeamServer, user: str | None = None, password: str | None = None):
    """An MlflowClient logged in as ``user`` (the admin by default)."""
    import mlflow
    os.environ["MLFLOW_TRACKING_USERNAME"] = user or server.ADMIN
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password or server.password
    return mlflow.MlflowClient(tracking_uri=server.url)


@pytest.fixture(autouse=True)
def _no_login_left_behind(monkeypatch):
    """client() sets the login in os.environ: restored after each test."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


def runs(server: TeamServer) -> list:
    c = client(server)
    return c.search_runs([e.experiment_id for e in c.search_experiments()], max_results=1000)


# --- what a logged-in user may do (first in this module: on a server nobody has used yet) ----

def _v3(server: TeamServer, method: str, path: str, auth, **fields) -> requests.Response:
    """MLflow's 3.0 REST API (the per-user permissions)."""
    given = {"params": fields} if method == "GET" else {"json": fields}
    return requests.request(method, f"{server.url}/api/3.0/mlflow/{path}", auth=auth, timeout=30, **given)


@pytest.fixture(scope="module")
def users(server):
    """Two users made by the admin, with the default permission (READ) and nothing granted."""
    logins = {name: (name, f"{name}-password-123") for name in ("mallory", "trent")}
    for username, password in logins.values():
        made = _call(server, "POST", "users/create", auth=(server.ADMIN, server.password), username=username,
                     password=password)
        assert made.status_code == 200, made.text
    return logins


def _permission(server: TeamServer, login, resource_type: str, resource_id: str) -> str:
    got = _v3(server, "GET", "users/permissions/get", login, username=login[0], resource_type=resource_type,
              resource_id=resource_id)
    assert got.status_code == 200, got.text
    return got.json()["permission"]


def test_a_new_user_cannot_own_the_projects_experiment_or_model(server, users):
    """The server made both names as the admin when it was set up, before anyone logged in."""
    mallory = users["mallory"]
    got = _call(server, "GET", f"experiments/get-by-name?experiment_name={EXPERIMENT}", auth=mallory)
    assert got.status_code == 200, got.text
    experiment_id = got.json()["experiment"]["experiment_id"]
    for path, name in (("experiments/create", EXPERIMENT), ("registered-models/create", MODEL)):
        taken = _call(server, "POST", path, auth=mallory, name=name)
        assert taken.status_code == 400 and taken.json()["error_code"] == "RESOURCE_ALREADY_EXISTS", taken.text
    for resource_type, resource_id in (("experiment", experiment_id), ("registered_model", MODEL)):
        assert _permission(server, mallory, resource_type, resource_id) == "READ"
        granted = _v3(server, "POST", "users/permissions/grant", mallory, username="trent",
                      resource_type=resource_type, resource_id=resource_id, permission="EDIT")
        assert granted.status_code == 403, granted.text  # no MANAGE: no grants to anyone
    assert _call(server, "POST", "registered-models/rename", auth=mallory, name=MODEL,
                 new_name="taken").status_code == 403
    assert _call(server, "POST", "experiments/delete", auth=mallory, experiment_id=experiment_id).status_code == 403


def test_a_default_user_creates_experiments_and_models_of_their_own_and_manages_them(server, users):
    """'Read everything, write nothing' is not what default READ means: a user creates
    experiments and registered models, gets MANAGE on them, and grants others EDIT there."""
    mallory, trent = users["mallory"], users["trent"]
    made = _call(server, "POST", "experiments/create", auth=mallory, name="mallory's experiment")
    assert made.status_code == 200, made.text
    assert _call(server, "POST", "registered-models/create", auth=mallory, name="mallory-model").status_code == 200
    for resource_type, resource_id in (("experiment", made.json()["experiment_id"]),
                                       ("registered_model", "mallory-model")):
        assert _permission(server, mallory, resource_type, resource_id) == "MANAGE"
        granted = _v3(server, "POST", "users/permissions/grant", mallory, username="trent",
                      resource_type=resource_type, resource_id=resource_id, permission="EDIT")
        assert granted.status_code == 200, granted.text
        assert _permission(server, trent, resource_type, resource_id) == "EDIT"


def test_any_user_lists_every_user_name_and_who_is_the_admin(server, users):
    listed = _call(server, "GET", "users/list", auth=users["trent"])
    assert listed.status_code == 200, listed.text
    admins = {u["username"]: u["is_admin"] for u in listed.json()["users"]}
    assert {server.ADMIN: True, "mallory": False, "trent": False}.items() <= admins.items()
    # another user's record, their password, new users: the admin's alone
    assert _call(server, "GET", "users/get?username=mallory", auth=users["trent"]).status_code == 403
    assert requests.patch(f"{server.url}/api/2.0/mlflow/users/update-password", auth=users["trent"], timeout=30,
                          json={"username": "mallory", "password": "x" * 16}).status_code == 403
    assert _call(server, "POST", "users/create", auth=users["trent"], username="eve",
                 password="eve-password-123").status_code == 403


def test_wrong_passwords_are_never_throttled(server, users):
    """No lockout, no delay, no 429: each guess costs the server one password hash, nothing more."""
    t0 = time.perf_counter()
    codes = {_call(server, "GET", "experiments/search?max_results=1", auth=(server.ADMIN, f"guess-{i}")).status_code
             for i in range(20)}
    print(f"20 wrong passwords in {time.perf_counter() - t0:.1f} s")
    assert codes == {401}
    assert _call(server, "GET", "experiments/search?max_results=1",
                 auth=(server.ADMIN, server.password)).status_code == 200  # at once, after 20 misses


# --- what PostgreSQL keeps from MLflow's role and from its own account ----------------------

def _postgres_processes(server: TeamServer) -> list:
    import psutil
    postmaster = psutil.Process(int((server.data / "postgres" / "postmaster.pid").read_text().split()[0]))
    return [postmaster, *postmaster.children(recursive=True)]


def test_no_process_of_another_user_holds_the_admin_password(server):
    """Neither the postgres account's processes (PostgreSQL) nor any other user's: their
    /proc/<pid>/environ holds no password (MLflow's own processes, this user's, need it)."""
    import psutil
    postgres = {p.pid for p in _postgres_processes(server)}
    assert len(postgres) > 1  # the postmaster and its workers
    checked = set()
    for p in psutil.process_iter():
        try:
            if p.uids().real == os.getuid() and p.pid not in postgres:
                continue
            environ = Path(f"/proc/{p.pid}/environ").read_bytes()
        except (psutil.Error, OSError):  # gone, or not ours to read
            continue
        assert server.password.encode() not in environ, (p.pid, p.name(), p.username())
        checked.add(p.pid)
    assert postgres <= checked


def test_mlflows_database_role_owns_its_databases_and_cannot_read_files(server):
    """MLflow connects as ``mlflow``: owner of its two databases, no superuser, so PostgreSQL's
    file functions (which would read /proc/<pid>/environ, or any file of the postgres account)
    are refused; and the superuser is not reachable from this (MLflow's) OS user."""
    import psycopg2

    from tracking.server import AUTH_DATABASE, DATABASE, DB_USER
    socket = str(server.data / "run")
    with psycopg2.connect(dbname=DATABASE, user=DB_USER, host=socket) as db, db.cursor() as sql:
        sql.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user")
        assert sql.fetchone() == (False, False, False)
        sql.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname IN (%s, %s)",
                    (DATABASE, AUTH_DATABASE))
        assert dict(sql.fetchall()) == {DATABASE: DB_USER, AUTH_DATABASE: DB_USER}
        postmaster = _postgres_processes(server)[0].pid
        for query in ("SELECT pg_read_file('/etc/hostname')",
                      f"SELECT pg_read_binary_file('/proc/{postmaster}/environ')", "COPY (SELECT 1) TO PROGRAM 'true'"):
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                sql.execute(query)
            db.rollback()
    superuser = _postgres_processes(server)[0].username()
    with pytest.raises(psycopg2.OperationalError, match="authentication failed"):
        psycopg2.connect(dbname="postgres", user=superuser, host=socket).close()


def test_postgres_log_is_0600_and_holds_no_statement_values(server):
    """A failed INSERT of a user (a duplicate name) with its password hash: the error is logged,
    not the statement, its values, nor the DETAIL that quotes the key."""
    made = [_call(server, "POST", "users/create", auth=(server.ADMIN, server.password), username="victor",
                  password=f"victor-password-{i}") for i in (1, 2)]
    assert made[0].status_code == 200 and made[1].json()["error_code"] == "RESOURCE_ALREADY_EXISTS"
    log = server.data / "postgres.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    text = log.read_text()
    assert 'violates unique constraint "users_username_key"' in text  # the failure itself is there
    for leak in ("STATEMENT:", "DETAIL:", "INSERT INTO", "victor", "scrypt:", "pbkdf2:"):
        assert leak not in text, leak



def test_repro_logs_one_run_with_metrics_model_and_proxied_artifacts(server, repo):
    root, _, _ = repo
    run_id = (root / "models/mlflow_run_id").read_text().strip()
    [run] = runs(server)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert {"loss", "test_acc", "parity_max_abs_diff", "verify_ok", "accuracy", "fp32_accuracy",
            "fp32_latency"} <= set(run.data.metrics)
    assert run.data.params["train.epochs"] == "1"
    # proxied: the run's artifacts live in the server's folder, reached through HTTP only
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = {p.name for p in (server.data / "artifacts").rglob("*") if p.is_file()}
    assert {"model.onnx", "shapes.md", "dvc.lock", "MLmodel"} <= stored
    assert not (root / "mlruns").exists() and not (root / "mlartifacts").exists() and not (root / "mlflow.db").exists()
    version = client(server).get_model_version_by_alias(MODEL, "candidate")
    assert version.run_id == run_id and "eval_accuracy" in version.tags
    assert not list((root / ".mlflow-spool").glob("*.jsonl"))  # nothing waited for a replay


def test_a_teammate_elsewhere_loads_the_champion_through_the_server(server, repo, tmp_path):
    root, env, _ = repo
    result = subprocess.run([sys.executable, "-m", "commands.promote"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # another folder, no shared files: the server's URL and a login are all it has
    teammate = tmp_path / "teammate"
    teammate.mkdir()
    code = ("import mlflow, sys; print(mlflow.artifacts.download_artifacts("
            f"'models:/{MODEL}@champion', dst_path=sys.argv[1]))")
    env_teammate = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env_teammate.update(server.admin_env)
    got = subprocess.run([sys.executable, "-c", code, str(teammate / "model")], cwd=teammate, env=env_teammate,
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert (teammate / "model/model.onnx").read_bytes() == (root / "models/model.onnx").read_bytes()


def test_two_queued_experiments_run_at_once_and_log_one_run_each(server, repo):
    """dvc exp run --queue, then --run-all --jobs 2: two trainings log to the team server at the
    same time, each as one run of its own with its own registered version. (A lone `dvc exp run`
    is the same code path: the end-to-end tests run it against a local store.)"""
    root, env, _ = repo
    for name in ("queued-a", "queued-b"):
        result = dvc(root, "exp", "run", "--queue", "-n", name, "-S", f"train.seed={len(name) + ord(name[-1])}",
                     env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    result = dvc(root, "exp", "run", "--run-all", "--jobs", "2", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    by_name = {r.info.run_name: r for r in runs(server)}
    assert {"queued-a", "queued-b"} <= set(by_name) and len(by_name) == 3  # one run per training
    for name in ("queued-a", "queued-b"):
        run = by_name[name]
        assert run.info.status == "FINISHED" and {"loss", "accuracy", "verify_ok"} <= set(run.data.metrics)
        assert run.data.tags["dvc_exp_name"] == name
    versions = client(server).search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 3  # every export registered a version
    assert not list((root / ".mlflow-spool").glob("*.jsonl"))


# --- logins ---------------------------------------------------------------------------------

def _call(server: TeamServer, method: str, path: str, auth=None, **body) -> requests.Response:
    return requests.request(method, f"{server.url}/api/2.0/mlflow/{path}", auth=auth,
                            json=body or None, timeout=30)


def test_no_login_or_a_wrong_password_gets_401(server):
    assert _call(server, "GET", "experiments/search?max_results=1").status_code == 401
    assert _call(server, "GET", "experiments/search?max_results=1",
                 auth=(server.ADMIN, server.password + "x")).status_code == 401
    assert _call(server, "GET", "experiments/search?max_results=1",
                 auth=(server.ADMIN, server.password)).status_code == 200


def test_a_reader_reads_runs_and_cannot_create_runs_register_models_or_move_aliases(server, repo):
    root, _, _ = repo
    admin = (server.ADMIN, server.password)
    reader = ("reader", "reader-password-123")
    made = _call(server, "POST", "users/create", auth=admin, username=reader[0], password=reader[1])
    assert made.status_code == 200, made.text
    run_id = (root / "models/mlflow_run_id").read_text().strip()
    got = _call(server, "GET", f"runs/get?run_id={run_id}", auth=reader)
    assert got.status_code == 200 and got.json()["run"]["info"]["run_id"] == run_id
    experiment_id = got.json()["run"]["info"]["experiment_id"]
    assert _call(server, "POST", "runs/search", auth=reader, experiment_ids=[experiment_id]).status_code == 200
    runs_before = len(runs(server))
    champion = client(server).get_model_version_by_alias(MODEL, "champion").version
    other = next(v.version for v in client(server).search_model_versions(f"name='{MODEL}'") if v.version != champion)

    refused = {
        "create a run": _call(server, "POST", "runs/create", auth=reader, experiment_id=experiment_id),
        "log a metric": _call(server, "POST", "runs/log-metric", auth=reader, run_id=run_id, key="x", value=1.0,
                              timestamp=0, step=0),
        "register a version": _call(server, "POST", "model-versions/create", auth=reader, name=MODEL,
                                    source=f"runs:/{run_id}/fp32", run_id=run_id),
        "move an alias": _call(server, "POST", "registered-models/alias", auth=reader, name=MODEL,
                               alias="champion", version=other),
        "delete the model": _call(server, "DELETE", "registered-models/delete", auth=reader, name=MODEL),
    }
    assert {what: r.status_code for what, r in refused.items()} == dict.fromkeys(refused, 403)
    c = client(server)  # nothing moved
    assert c.get_run(run_id).data.metrics.get("x") is None
    assert len(runs(server)) == runs_before
    assert c.get_model_version_by_alias(MODEL, "champion").version == champion


def test_a_teammate_granted_edit_logs_runs_and_moves_aliases(server, repo):
    """The README's way to let a teammate write: a user, then EDIT on the experiment and the model."""
    from mlflow.server import get_app_client

    client(server)  # logged in as the admin
    auth = get_app_client("basic-auth", tracking_uri=server.url)
    auth.create_user("alice", "alice-password-123")
    experiment = client(server).get_experiment_by_name("mnist-onnx")
    refused = _call(server, "POST", "runs/create", auth=("alice", "alice-password-123"),
                    experiment_id=experiment.experiment_id)
    assert refused.status_code == 403  # a new user reads only
    auth.grant_user_permission("alice", "experiment", experiment.experiment_id, "EDIT")
    auth.grant_user_permission("alice", "registered_model", MODEL, "EDIT")
    alice = client(server, "alice", "alice-password-123")
    run = alice.create_run(experiment.experiment_id, run_name="alice's run")
    alice.log_metric(run.info.run_id, "loss", 0.5)
    alice.set_terminated(run.info.run_id)
    alice.set_registered_model_alias(MODEL, "staging", "1")
    admin = client(server)
    assert admin.get_run(run.info.run_id).data.metrics == {"loss": 0.5}
    assert admin.get_model_version_by_alias(MODEL, "staging").version == "1"


def test_the_admin_password_is_in_no_log_command_line_param_or_tag(server, repo):
    _, _, repro_output = repo
    assert server.password not in server.log_text()
    assert server.password not in repro_output
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert "tracking.server" in ps and "mlflow server" in ps.replace("-m mlflow server", "mlflow server")
    assert server.password not in ps
    for path in server.data.rglob("*"):  # the settings MLflow reads, the cluster's files
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert server.password.encode() not in path.read_bytes(), path
    for run in runs(server):
        assert server.password not in json.dumps([run.data.params, run.data.tags])


# --- outages against the team server ----------------------------------------------------------

def _first_epoch_logged(server: TeamServer, proc: subprocess.Popen) -> str:
    """Waits until the training's first epoch is on the server; returns the run id."""
    c = client(server)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        for run in c.search_runs([e.experiment_id for e in c.search_experiments()], max_results=1000):
            if c.get_metric_history(run.info.run_id, "loss"):
                return run.info.run_id
        time.sleep(0.2)
    raise AssertionError("no epoch reached the server before the training ended")


@pytest.mark.parametrize("outage", ["mlflow server killed", "postgresql restarted"])
def test_the_spool_replays_into_the_team_server_after_an_outage(workdir, outage):
    epochs = 12  # the outage must land mid-run also on a fast machine
    with TeamServer() as srv:
        env = {"MLFLOW_TRACKING_USERNAME": srv.ADMIN, "MLFLOW_TRACKING_PASSWORD": srv.password}
        proc = train(workdir, srv.url, epochs=epochs, wait=False, env=env)
        run_id = _first_epoch_logged(srv, proc)
        logged = len(client(srv).get_metric_history(run_id, "loss"))
        if outage == "mlflow server killed":
            os.killpg(srv.mlflow_pid(), 9)  # MLflow and its workers; the wrapper then stops PostgreSQL
            srv.proc.wait(timeout=60)
        else:
            from tracking.server import Cluster
            Cluster(srv.data).restart()  # every connection in MLflow's pool dies
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert 1 <= logged < epochs, "the outage should come mid-run"
        assert (workdir / "run_id").read_text().strip() == run_id
        if outage == "mlflow server killed":
            assert "kept in" in err
            srv.start()  # the same folder and port: the same database
        result = sync(workdir, srv.url, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        client(srv)  # the admin's login, for the check's own client
        assert_run_holds_everything_logged(srv.url, run_id, workdir, epochs=epochs)
    shutil.rmtree(workdir / "spool", ignore_errors=True)


def test_the_server_on_a_postgresql_it_is_given(tmp_path):
    """--database-uri / --auth-database-uri: a PostgreSQL someone else runs (here: a cluster of our
    own, started apart), and no cluster made by the server."""
    import tempfile

    from tracking.server import AUTH_DATABASE, DATABASE, Cluster

    outside = Cluster(Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp")))
    outside.data.chmod(0o711)
    outside.start()
    try:
        srv = TeamServer()
        srv.extra_args = ["--database-uri", outside.uri(DATABASE), "--auth-database-uri", outside.uri(AUTH_DATABASE)]
        with srv:
            assert _call(srv, "GET", "experiments/search?max_results=1").status_code == 401
            made = client(srv).create_experiment("given-postgres")
            assert client(srv).get_experiment(made).name == "given-postgres"
            assert not (srv.data / "postgres").exists()  # it used the one it was given
    finally:
        outside.stop()
        shutil.rmtree(outside.data, ignore_errors=True)
