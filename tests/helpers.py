"""Processes the tests (and benchmarks.load) start and stop: our service, an MLflow server.

Each binds 127.0.0.1 on a free port and is stopped on the way out, also when the test fails.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(db: Path, port: int):
    """`mlflow server` on a sqlite file; killed with SIGKILL (the whole process group) on exit."""
    log = open(db.with_suffix(f".{port}.log"), "a")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=db.parent, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start:\n"
                                       + db.with_suffix(f".{port}.log").read_text()) from None
                time.sleep(0.3)
        yield proc
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


class SpawnedServer:
    """python -m stages.serve on a free port; stopped with SIGTERM (graceful) on exit."""

    def __init__(self, model: Path, *flags: str, timeout_s: float = 60):
        self.proc = subprocess.Popen([sys.executable, "-m", "stages.serve", "--model", str(model), "--port", "0",
                                      *flags], cwd=REPO, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        deadline = time.monotonic() + timeout_s
        self.url = None
        assert self.proc.stderr is not None  # stderr=PIPE
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("the server exited before it was ready:\n" + "".join(self.log))
            self.log.append(line)
            if m := re.search(r"listening on (http://\S+)", line):
                self.url = m.group(1)
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
