"""How long a teammate waits for the whole pipeline's outputs from an SSH remote.

    python -m benchmarks.dvc_remote          (after a `dvc repro` here: it pushes what it made)

Starts sshd on 127.0.0.1 (a throwaway key, a free port; Debian's openssh-server), then, in
temporary clones of this repository's last commit: one clone pushes the outputs committed
in dvc.lock (from this checkout's DVC cache) to the SSH remote, and a fresh clone pulls them
and runs `dvc repro`, which must run no stage. Prints the push and pull times, the bytes
moved and the CPU they were measured on. Both ends share this machine's CPUs and disk: a
remote across a network adds its latency and bandwidth to these figures.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.services import REPO, SSHD, Sshd
from pipeline.machine import hardware


def sh(cwd: Path, *cmd: str) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"dvc_remote: {' '.join(cmd)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def dvc(cwd: Path, *args: str) -> float:
    """Runs ``dvc args`` in ``cwd``; its wall time in seconds."""
    t0 = time.perf_counter()
    out = sh(cwd, sys.executable, "-m", "dvc", *args)
    if args[0] == "repro" and "Running stage" in out:
        sys.exit(f"dvc_remote: `dvc repro` after the pull ran stages:\n{out}")
    return time.perf_counter() - t0


def tracked_bytes(repo: Path) -> int:
    """Bytes in the workspace under the outputs DVC tracks (dvc.lock's outs with a cache)."""
    listing = json.loads(sh(repo, sys.executable, "-m", "dvc", "data", "status", "--granular", "--json",
                            "--unchanged"))
    files = [repo / p for p in listing.get("unchanged", [])]
    return sum(f.stat().st_size for f in files if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dvc_remote", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    if not SSHD.exists():
        sys.exit(f"dvc_remote: needs {SSHD} (apt-get install openssh-server)")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "sshd").mkdir()
        sshd = Sshd(tmp / "sshd").start()
        try:
            pusher, teammate = tmp / "pusher", tmp / "teammate"
            sh(tmp, "git", "clone", "-q", str(REPO), str(pusher))
            sh(pusher, sys.executable, "-m", "dvc", "config", "--local", "cache.dir", str(REPO / ".dvc/cache"))
            sh(pusher, sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", sshd.url(tmp / "storage"))
            sh(pusher, sys.executable, "-m", "dvc", "remote", "modify", "--local", "storage", "keyfile",
               str(tmp / "sshd/user_key"))
            sh(pusher, "git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm",
               "remote", ".dvc/config")
            push_s = dvc(pusher, "push", "--run-cache")
            sh(tmp, "git", "clone", "-q", str(pusher), str(teammate))
            sh(teammate, sys.executable, "-m", "dvc", "remote", "modify", "--local", "storage", "keyfile",
               str(tmp / "sshd/user_key"))
            pull_s = dvc(teammate, "pull")
            size = tracked_bytes(teammate)
            repro_s = dvc(teammate, "repro")
        finally:
            sshd.stop()
    mb = size / 1e6
    print(f"whole pipeline's outputs: {mb:.1f} MB")
    print(f"dvc push --run-cache to the SSH remote: {push_s:6.1f} s")
    print(f"dvc pull into a fresh clone:            {pull_s:6.1f} s ({mb / pull_s:.0f} MB/s)")
    print(f"dvc repro after the pull (runs nothing): {repro_s:5.1f} s")
    print(f"on {hardware().get('cpu')}, sshd on 127.0.0.1")
    if args.out:
        args.out.write_text(json.dumps({"megabytes": mb, "push_s": push_s, "pull_s": pull_s, "repro_s": repro_s,
                                        "hardware": hardware()}, indent=2))


if __name__ == "__main__":
    main()
