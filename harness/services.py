"""Processes the tests and the benchmarks start and stop: our service, MLflow servers, sshd.

Each binds 127.0.0.1 on a free port and is stopped on the way out, also when the test fails.
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SSHD = Path("/usr/sbin/sshd")  # Debian's openssh-server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(url: str, proc: subprocess.Popen, timeout_s: float, why: Callable[[], str]) -> None:
    """Until a GET of ``url`` is answered with a success status (an error status is "not yet");
    RuntimeError(``why()``) if ``proc`` exits first or time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(why()) from None
            time.sleep(0.3)


@contextmanager
def mlflow_server(db: Path, port: int):
    """`mlflow server` on a sqlite file; killed with SIGKILL (the whole process group) on exit."""
    log = open(db.with_suffix(f".{port}.log"), "a")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=db.parent, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/health", proc, 120,
                           lambda: "mlflow server did not start:\n" + db.with_suffix(f".{port}.log").read_text())
        yield proc
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


class SpawnedServer:
    """python -m commands.serve (or ``command``: ``serving``) on a free port; stopped with SIGTERM
    (graceful) on exit.

    Returns once the model is loaded and warmed up, or, with ``ready=False``, as soon as the
    port is bound. ``env`` is added to the server's environment; ``cwd`` runs another checkout.
    """

    def __init__(self, model: Path, *flags: str, timeout_s: float = 60, ready: bool = True,
                 env: dict[str, str] | None = None, cwd: Path = REPO, command: str | None = None):
        # a checkout from before 2026-12-01 (benchmarks.load --baseline) has the command in stages/
        command = command or ("commands.serve" if (cwd / "commands" / "serve.py").is_file() else "stages.serve")
        self.proc = subprocess.Popen([sys.executable, "-m", command, "--model", str(model), "--port", "0",
                                      *flags], cwd=cwd, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.log: list[str] = []
        deadline = time.monotonic() + timeout_s
        self.url = None
        assert self.proc.stderr is not None  # stderr=PIPE
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("the server exited before it was ready:\n" + "".join(self.log))
            self.log.append(line)
            if m := re.search(r"listening on (http://[^\s;,)]+)", line):
                self.url = m.group(1)
                if not ready:
                    break
            if line.startswith("serve: ready"):
                break
        else:
            raise RuntimeError("the server did not become ready in time:\n" + "".join(self.log))
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def wait(self, timeout: float) -> int:
        """The exit code, once the process has ended and its last words are in ``log``."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self) -> int:
        self.proc.terminate()
        return self.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()


class StaticServer:
    """Python's own static file server (http.server) on 127.0.0.1 and a free port, serving ``folder``
    as any static web host would: no COOP/COEP headers, nothing of ours. ``requests`` logs every
    request it answered as (method, path, status). Stopped on exit."""

    def __init__(self, folder: Path):
        import functools
        import http.server

        self.folder = Path(folder)
        self.requests: list[tuple[str, str, int]] = []
        log = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                log.append((self.command, self.path, int(code)))

            def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
                pass  # 404s and the like are in ``requests``; nothing on stderr

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()),
                                                     functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def paths(self) -> set[str]:
        """The paths asked for, without their query strings."""
        return {path.partition("?")[0] for _, path, _ in self.requests}

    def __enter__(self) -> StaticServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)


class TeamServer:
    """``python -m tracking.server`` (PostgreSQL, proxied artifacts, logins) on a free port.

    Its data folder is made under /tmp, not pytest's 0700 tmp folders: run as root, PostgreSQL
    runs as the ``postgres`` user, which must be able to reach its cluster. ``stop()`` ends the
    server with SIGTERM (MLflow, then PostgreSQL); ``close()`` also removes the folder.
    """

    ADMIN = "admin"

    def __init__(self, data: Path | None = None, port: int | None = None, password: str | None = None):
        import secrets
        import tempfile
        self.data = data or Path(tempfile.mkdtemp(prefix="mlflow-team-", dir="/tmp"))
        self.port = port or free_port()
        self.password = password or "pw-" + secrets.token_urlsafe(18)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data.parent / f"{self.data.name}.log"
        self.proc: subprocess.Popen | None = None
        self.extra_args: list[str] = []  # more flags for tracking.server

    @property
    def admin_env(self) -> dict[str, str]:
        """What a client sets to log in as the admin."""
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": self.ADMIN,
                "MLFLOW_TRACKING_PASSWORD": self.password}

    def start(self, timeout_s: float = 180) -> TeamServer:
        """Returns once the server says it is ready: MLflow answers and the admin holds the
        project's experiment and registered model."""
        before = len(self.log_text())
        log = open(self.log_path, "a")
        env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": self.password, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([str(REPO / "scripts/mlflow_server.sh"), "--data", str(self.data),
                                      "--port", str(self.port), "--workers", "1", *self.extra_args],
                                     stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s  # "ready" comes after the admin claimed the project's names
        while "mlflow-server: ready on" not in self.log_text()[before:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the team server did not start:\n{self.log_text()}")
            time.sleep(0.3)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def mlflow_pid(self) -> int:
        """The ``mlflow server`` process (leader of its own process group, with its workers)."""
        return int(re.findall(r"mlflow server \(pid (\d+)\)", self.log_text())[-1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """Whatever a killed server left behind: its MLflow workers, its PostgreSQL."""
        import psutil
        for p in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if str(self.data) in cmdline and "mlflow" in cmdline:
                with suppress(psutil.Error):
                    p.kill()
        if (self.data / "postgres" / "postmaster.pid").exists():
            from tracking.server import Cluster
            Cluster(self.data).stop()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> TeamServer:
        try:
            return self.start()
        except BaseException:  # a server that did not start leaves nothing behind either
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


class Sshd:
    """Debian's sshd on 127.0.0.1 and a free port: a host key and a user key of its own, the
    current user may log in with that key only. Stopped (SIGTERM) by ``stop()``."""

    def __init__(self, folder: Path):
        self.folder = folder
        for key in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
        shutil.copy(folder / "user_key.pub", folder / "authorized_keys")
        self.port = free_port()
        self.user = getpass.getuser()
        (folder / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {folder / 'host_key'}",
            f"PidFile {folder / 'sshd.pid'}", f"AuthorizedKeysFile {folder / 'authorized_keys'}",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no", "MaxStartups 100",
            "Subsystem sftp internal-sftp", ""]))
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege-separation folder
        self.proc: subprocess.Popen | None = None

    def start(self) -> Sshd:
        with open(self.folder / "sshd.log", "a") as log:  # sshd keeps its own copy of the descriptor
            self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self.folder / "sshd_config")], stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("sshd did not start:\n" + (self.folder / "sshd.log").read_text())
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def url(self, path: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"
