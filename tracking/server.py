"""The team's MLflow server: ``mlflow server`` on PostgreSQL, proxied artifacts, logins.

    MLFLOW_AUTH_ADMIN_PASSWORD=... python -m tracking.server --data /srv/mlflow [--host H] [--port P]

Everything it keeps lives under ``--data``:

- ``postgres/``: a PostgreSQL cluster made here on first start (``initdb``), reached only
  through a Unix socket in ``run/`` (no TCP port, no database password): the runs, the
  model registry (database ``mlflow``) and the logins (database ``mlflow_auth``). MLflow
  connects as the role ``mlflow``, which owns those two databases and is no superuser (a
  superuser can read any file the server can); only this command's OS user may log in as it
  (peer authentication), and only the cluster's OS user as the superuser. PostgreSQL starts
  with an environment of its own, holding none of ours (the admin password stays out of
  ``/proc/<pid>/environ`` of the ``postgres`` account's processes), and its log
  (``postgres.log``, 0600) records errors without the statements or values that caused them.
  Or give ``--database-uri`` and ``--auth-database-uri`` to use a PostgreSQL server you run.
- ``artifacts/``: the proxied artifact store. Clients upload and download through the
  server (``--serve-artifacts``); they need ``MLFLOW_TRACKING_URI`` and a login, nothing else.
- ``basic_auth.ini`` and ``secret_key``: MLflow's basic-auth app settings (new users read
  everything and change nothing of the project's unless granted; what else READ permits is
  in docs/team.md) and its CSRF key.

The admin password is read by MLflow from ``MLFLOW_AUTH_ADMIN_PASSWORD`` when it first
creates the admin user; it is never written to a file or a command line. Once MLflow answers,
the project's experiment and registered model are created as the admin (when missing), so
that no other user, who would get MANAGE on a name they create first, can own them. Run as root,
PostgreSQL runs as the ``postgres`` system user (it refuses root). Stop with SIGTERM or
Ctrl-C: MLflow first, then PostgreSQL. If MLflow dies, PostgreSQL is stopped and the
command exits non-zero.
"""
from __future__ import annotations

import argparse
import base64
import configparser
import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tracking.store import EXPERIMENT

ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"  # MLflow's own name for it
DATABASE, AUTH_DATABASE, DB_USER = "mlflow", "mlflow_auth", "mlflow"
HBA_MARK = "# tracking.server: Unix socket only"  # first line of the pg_hba.conf we write
# PostgreSQL's logging: errors without the statement that failed (log_min_error_statement) nor
# its DETAIL (terse: a unique violation's DETAIL quotes the key), no statements, no bind values.
# Superuser-only settings: MLflow's role can't change them.
QUIET_LOG = {"log_min_error_statement": "panic", "log_error_verbosity": "terse", "log_statement": "none",
             "log_min_duration_statement": "-1", "log_parameter_max_length": "0",
             "log_parameter_max_length_on_error": "0"}


class ServerError(RuntimeError):
    """What stops the server from starting, said so the user can fix it."""


def log(message: str) -> None:
    print(f"mlflow-server: {message}", file=sys.stderr, flush=True)


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program (initdb, pg_ctl, ...): on PATH, else Debian's newest."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                                                   key=lambda p: int(p.split("/")[4]), reverse=True)), None)
    if not found:
        raise ServerError(f"PostgreSQL's {name} is not installed: apt-get install postgresql "
                          "(or give --database-uri for a server you run)")
    return found


@dataclass
class Cluster:
    """A PostgreSQL cluster of our own under ``<data>/postgres``, on a Unix socket only."""

    data: Path

    @property
    def pgdata(self) -> Path:
        return self.data / "postgres"

    @property
    def socket_dir(self) -> Path:
        return self.data / "run"

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg2://{DB_USER}@/{database}?host={self.socket_dir}"

    def _as_owner(self, *cmd: str) -> list[str]:
        """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` user."""
        if os.geteuid() != 0:
            return list(cmd)
        return ["runuser", "-u", "postgres", "--", *cmd]

    @staticmethod
    def _env() -> dict[str, str]:
        """PostgreSQL's environment: the path and the locale, none of our secrets. Whatever
        it is started with can be read in ``/proc/<pid>/environ`` by its OS user, and through
        SQL by any superuser role."""
        return {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TZ") or k.startswith("LC_")}

    def _run(self, *cmd: str) -> str:
        result = subprocess.run(self._as_owner(*cmd), capture_output=True, text=True, env=self._env())
        if result.returncode != 0:
            raise ServerError(f"{Path(cmd[0]).name} failed:\n{result.stdout}{result.stderr}")
        return result.stdout

    def _sql(self, query: str) -> str:
        """``query`` as the cluster's superuser (its OS user, by peer authentication)."""
        return self._run(postgres_bin("psql"), "-h", str(self.socket_dir), "-d", "postgres", "-v",
                         "ON_ERROR_STOP=1", "-tAc", query).strip()

    def _give_to_owner(self, *paths: Path) -> None:
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise ServerError("running as root needs the 'postgres' system user "
                                  "(apt-get install postgresql creates it)") from None
            for path in paths:
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def _write_owned(self, path: Path, text: str) -> None:
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(text)
        self._give_to_owner(path)

    def _write_auth_files(self) -> None:
        """Who may log in as whom, by the OS user at the socket's other end (peer): this
        command's user as ``mlflow`` (through the map ``mlflow``), the cluster's user as itself,
        its superuser. No passwords, no TCP."""
        self._write_owned(self.pgdata / "pg_hba.conf", f"{HBA_MARK}\n"
                          f"local all {DB_USER} peer map={DB_USER}\nlocal all all peer\n")
        self._write_owned(self.pgdata / "pg_ident.conf",
                          f"{DB_USER} {pwd.getpwuid(os.geteuid()).pw_name} {DB_USER}\n")

    def _legacy(self) -> bool:
        """A cluster made by an earlier version: ``mlflow`` is its superuser, trusted on the socket."""
        return not (self.pgdata / "pg_hba.conf").read_text().startswith(HBA_MARK)

    def start(self) -> None:
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        legacy = (self.pgdata / "PG_VERSION").is_file() and self._legacy()
        if not legacy and not (self.pgdata / "PG_VERSION").is_file():
            log(f"creating a PostgreSQL cluster in {self.pgdata}")
            self.pgdata.mkdir(mode=0o700, exist_ok=True)
            self._give_to_owner(self.pgdata)
            # the superuser is named after the cluster's OS user (initdb's default)
            self._run(postgres_bin("initdb"), "-D", str(self.pgdata), "-E", "UTF8",
                      "--auth-local=peer", "--auth-host=reject")
        if not legacy:
            self._write_auth_files()  # also when another OS user starts the server now
        self._give_to_owner(self.socket_dir)
        log_file = self.data / "postgres.log"
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        log_file.chmod(0o600)  # also one made world-readable before
        self._give_to_owner(log_file)
        settings = {"listen_addresses": "", "unix_socket_directories": str(self.socket_dir), **QUIET_LOG}
        self._run(postgres_bin("pg_ctl"), "-D", str(self.pgdata), "-l", str(log_file), "-w", "-t", "60",
                  "-o", " ".join(f"-c {k}='{v}'" for k, v in settings.items()), "start")
        if legacy:
            log(f"warning: {self.pgdata} was made by an earlier version, where MLflow connects as the "
                f"superuser '{DB_USER}' (which can read the server's files): see docs/team.md")
        else:
            if not self._sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{DB_USER}'"):
                self._sql(f"CREATE ROLE {DB_USER} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
            for database in (DATABASE, AUTH_DATABASE):
                if not self._sql(f"SELECT 1 FROM pg_database WHERE datname = '{database}'"):
                    self._run(postgres_bin("createdb"), "-h", str(self.socket_dir), "-O", DB_USER, database)
        log(f"PostgreSQL is up (socket in {self.socket_dir})")

    def stop(self) -> None:
        if (self.pgdata / "postmaster.pid").exists():
            subprocess.run(self._as_owner(postgres_bin("pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w",
                                          "stop"), capture_output=True, env=self._env())
            log("PostgreSQL stopped")

    def restart(self) -> None:
        """Stop (fast: every connection is cut) and start again, with the same log and socket."""
        self.stop()
        self.start()


def admin_username() -> str:
    return os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin")


def write_auth_config(data: Path, auth_database_uri: str) -> Path:
    """MLflow's basic-auth settings: logins kept in PostgreSQL, new users READ by default (which
    still lets them create experiments and models of their own: docs/team.md)."""
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": "READ",
        "database_uri": auth_database_uri,
        "admin_username": admin_username(),
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    path = data / "basic_auth.ini"
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:  # may hold a DB password
        config.write(f)
    return path


def secret_key(data: Path) -> str:
    """The CSRF key of the login pages: the same across restarts, kept beside the data (0600)."""
    path = data / "secret_key"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def mlflow_command(args: argparse.Namespace) -> list[str]:
    """The command line (``ps`` shows it to every user): no database URI, which may hold a password."""
    return [sys.executable, "-m", "mlflow", "server",
            "--serve-artifacts", "--artifacts-destination", str(args.data / "artifacts"),
            "--host", args.host, "--port", str(args.port), "--workers", str(args.workers),
            "--app-name", "basic-auth"]


def project_model_name() -> str:
    """``registry.model_name`` of the checkout this server runs from (params.yaml), or its default."""
    import yaml

    from pipeline.contract import RegistryConfig
    from pipeline.params import parse
    from tracking.store import repo_root
    path = repo_root() / "params.yaml"
    section = (yaml.safe_load(path.read_text()) or {}).get("registry") if path.is_file() else None
    return parse(RegistryConfig, section, "registry").model_name


def wait_until_up(url: str, server: subprocess.Popen, timeout_s: float = 300) -> bool:
    """Whether ``mlflow server`` answers /health before it dies or ``timeout_s`` is up."""
    deadline = time.monotonic() + timeout_s
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return True
        except OSError:
            time.sleep(0.3)
    return False


def _post(url: str, path: str, body: dict, login: tuple[str, str]) -> tuple[int, dict]:
    """POST to MLflow's REST API with a basic-auth login: (HTTP status, JSON answer)."""
    token = base64.b64encode(":".join(login).encode()).decode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as e:
        with contextlib.suppress(ValueError):
            return e.code, json.loads(e.read())
        return e.code, {}


def claim_project_names(url: str, login: tuple[str, str], experiment: str, model: str) -> None:
    """Create the project's experiment and registered model as the admin, when missing.

    MLflow's basic-auth gives MANAGE on an experiment or a registered model to whoever creates
    it, and a default-READ user may create both: on a fresh server, the first logged-in user to
    take these names would own them (grant EDIT to anyone, delete them). The admin takes them first.
    """
    for kind, path, name in (("experiment", "experiments/create", experiment),
                             ("registered model", "registered-models/create", model)):
        status, answer = _post(url, path, {"name": name}, login)
        if status == 200:
            log(f"created the {kind} '{name}' as {login[0]}: only the admin manages it")
        elif answer.get("error_code") != "RESOURCE_ALREADY_EXISTS":
            log(f"warning: could not create the {kind} '{name}' as {login[0]} (HTTP {status}: "
                f"{answer.get('message', '')[:200]}); is {ADMIN_PASSWORD_ENV} the admin's current password?")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to MLflow and its workers (one process group), SIGKILL after 30 s; also
    when MLflow itself has died and left workers behind."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tracking.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder for the cluster, artifacts and auth settings")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=2, help="MLflow server processes (default 2)")
    p.add_argument("--model-name", help="the registered model the admin creates (default: registry.model_name "
                   "in params.yaml)")
    p.add_argument("--database-uri", help="a postgresql:// URI of a server you run, instead of our own cluster "
                   "(keep its password in ~/.pgpass, not in the URI: command lines are visible in ps)")
    p.add_argument("--auth-database-uri", help="with --database-uri: another database, for the logins")
    args = p.parse_args(argv)
    if bool(args.database_uri) != bool(args.auth_database_uri):
        p.error("--database-uri and --auth-database-uri go together (the logins need a database of their own)")
    for uri in filter(None, (args.database_uri, args.auth_database_uri)):
        if not uri.startswith(("postgresql://", "postgresql+")):
            p.error(f"not a postgresql:// URI: {uri.split('@')[-1]}")
    if not os.environ.get(ADMIN_PASSWORD_ENV):
        p.error(f"set {ADMIN_PASSWORD_ENV} (the admin's password; it is read from the environment only)")
    if not args.model_name:
        from pipeline.errors import PipelineError
        try:
            args.model_name = project_model_name()
        except PipelineError as e:
            p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.data = args.data.resolve()
    args.data.mkdir(parents=True, exist_ok=True)
    (args.data / "artifacts").mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0:  # the postgres user must be able to pass through to its own folders
        args.data.chmod(args.data.stat().st_mode | 0o111)
    cluster = None if args.database_uri else Cluster(args.data)
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    server = None
    try:
        if cluster is not None:
            cluster.start()
        database_uri = args.database_uri or cluster.uri(DATABASE)  # type: ignore[union-attr]
        auth_uri = args.auth_database_uri or cluster.uri(AUTH_DATABASE)  # type: ignore[union-attr]
        env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(args.data, auth_uri)),
               "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
               or secret_key(args.data),
               # MLflow's GenAI job runners (seven processes, ~860 MB): nothing here submits jobs
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
        env["MLFLOW_BACKEND_STORE_URI"] = database_uri  # mlflow server's --backend-store-uri, off the command line
        server = subprocess.Popen(mlflow_command(args), env=env, start_new_session=True)
        log(f"mlflow server (pid {server.pid}) starting on http://{args.host}:{args.port}, "
            f"artifacts in {args.data / 'artifacts'}")
        local = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(args.host, f"[{args.host}]" if ":" in args.host
                                                             else args.host)
        url = f"http://{local}:{args.port}"
        if wait_until_up(url, server):
            claim_project_names(url, (admin_username(), os.environ[ADMIN_PASSWORD_ENV]), EXPERIMENT,
                                args.model_name)
            log(f"ready on http://{args.host}:{args.port}")
        code = server.wait()
        log(f"mlflow server exited with code {code}")
        return code or 1
    except KeyboardInterrupt:
        return 0 if stopping else 130
    except ServerError as e:
        log(f"error: {e}")
        return 1
    finally:
        if server is not None:
            stop_group(server)
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
