"""The service's image, built and run for real with podman (and runc): what the image tests and
benchmarks.image share.

Made for a machine that reaches no container registry: the base image is made locally from the
Debian mirror apt uses (mmdebstrap), and the image is built by scripts/image.sh on top of it.
Every container runs on 127.0.0.1 and a free port, as Kubernetes would run it (deploy/): read-only
root filesystem with no writable /tmp, every capability dropped, no privilege escalation.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from contextlib import suppress
from pathlib import Path

from harness.services import free_port

TOOLS = ("podman", "runc", "mmdebstrap")  # Debian's packages; scripts/test.sh installs them
BASE_PACKAGES = "python3,python3-venv,ca-certificates"  # what the Containerfile needs of a base
CONTAINER_PORT = 8000  # the Containerfile's EXPOSE and --port


def tool(name: str) -> str | None:
    """The program's path, also where sbin is not on PATH (runc is in /usr/sbin)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def unavailable() -> str | None:
    """Why containers can't be built and run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root: podman runs rootful here (port mapping, runc)"
    missing = [t for t in TOOLS if tool(t) is None]
    if missing:
        return f"needs {', '.join(missing)}: apt-get install {' '.join(missing)}"
    return None


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``podman ARGS`` with Debian's runc as the runtime (crun refuses cgroups v1 in hybrid mode)."""
    return subprocess.run([str(tool("podman")), "--runtime", str(tool("runc")), *args], capture_output=True,
                          text=True, timeout=timeout, check=check)


def ulimits() -> list[str]:
    """--ulimit flags within this process's hard limits: podman's own defaults (nofile 1048576)
    are above them on some machines, and runc then refuses to start the container."""
    def capped(limit: int, most: int) -> int:
        return most if limit == resource.RLIM_INFINITY else min(limit, most)
    nofile = capped(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
    nproc = capped(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def os_codename() -> str:
    """This machine's Debian release (bookworm, trixie, ...): its apt mirror has that one."""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise RuntimeError("no VERSION_CODENAME in /etc/os-release: not Debian?")


def make_base(folder: Path, tag: str) -> str:
    """A minimal Debian with Python (made by mmdebstrap from apt's mirror), imported as ``tag``."""
    tar = folder / "base.tar"
    subprocess.run([str(tool("mmdebstrap")), "--quiet", "--variant=minbase", f"--include={BASE_PACKAGES}",
                    # what no service reads: documentation, manual pages, translations
                    "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*", os_codename(), str(tar)],
                   check=True, capture_output=True, timeout=900)
    podman("import", "--quiet", str(tar), tag)
    tar.unlink()
    return tag


def build_image(checkout: Path, tag: str, base: str) -> str:
    """scripts/image.sh in ``checkout`` (its models/model.onnx baked in), on ``base``, as ``tag``."""
    subprocess.run([str(checkout / "scripts" / "image.sh"), "--tag", tag, "--base", base, "--",
                    "--pull=never", "--layers=false"],  # no registry; no intermediate images left behind
                   cwd=checkout, check=True, capture_output=True, timeout=1200,
                   env={**os.environ, "ENGINE": f"{tool('podman')} --runtime {tool('runc')}"})
    return tag


def remove_image(tag: str) -> None:
    podman("rmi", "--force", tag, check=False)


def image_size(tag: str) -> int:
    """The image's size in bytes, uncompressed, as podman reports it."""
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout)


class Container:
    """The image run detached on 127.0.0.1 and a free port, locked down as deploy/ runs it.

    ``start()`` returns once GET /v2/health/ready answers 200 (``ready_s`` says after how long).
    ``stop()`` sends SIGTERM and returns the exit code; leaving the block removes the container.
    """

    def __init__(self, image: str, *args: str, volumes: tuple[str, ...] = (), host_network: bool = False):
        self.name = f"mnist-onnx-test-{uuid.uuid4().hex[:12]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.image, self.volumes = image, volumes
        if host_network:  # the host's own network, no port mapping: then it must listen on 127.0.0.1 itself
            self.network = ["--network=host"]
            self.args = (*args, "--host", "127.0.0.1", "--port", str(self.port))
        else:
            self.network = ["--publish", f"127.0.0.1:{self.port}:{CONTAINER_PORT}"]
            self.args = args
        self.ready_s = float("nan")

    def start(self, timeout_s: float = 120) -> Container:
        t0 = time.perf_counter()
        podman("run", "--detach", "--name", self.name, *self.network, "--read-only", "--read-only-tmpfs=false",
               "--cap-drop=ALL", "--security-opt=no-new-privileges", "--pull=never", *ulimits(),
               *(f"--volume={v}" for v in self.volumes), self.image, *self.args)
        deadline = t0 + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        self.ready_s = time.perf_counter() - t0
                        return self
            except (OSError, urllib.error.HTTPError):
                pass
            if self.state()["Status"] != "running" or time.perf_counter() > deadline:
                raise RuntimeError(f"the container did not become ready:\n{self.logs()}")
            time.sleep(0.1)

    def state(self) -> dict:
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *command: str, user: str | None = None) -> subprocess.CompletedProcess:
        return podman("exec", *(["--user", user] if user else []), self.name, *command, check=False)

    def signal(self, name: str = "TERM") -> None:
        podman("kill", "--signal", name, self.name)

    def wait(self, timeout_s: float = 60) -> int:
        """The exit code, once the container has stopped."""
        return int(podman("wait", self.name, timeout=timeout_s).stdout.strip())

    def stop(self, timeout_s: float = 60) -> int:
        self.signal("TERM")
        return self.wait(timeout_s)

    def remove(self) -> None:
        with suppress(subprocess.SubprocessError):
            podman("rm", "--force", "--time", "0", self.name, check=False)

    def __enter__(self) -> Container:
        try:
            return self.start()
        except BaseException:
            self.remove()
            raise

    def __exit__(self, *exc) -> None:
        self.remove()
