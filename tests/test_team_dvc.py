"""Sharing data, models and run results through DVC remotes, for real: a folder, and sshd on
127.0.0.1 (Debian's openssh-server, a throwaway key, a free port) reached through dvc-ssh.

A teammate's fresh clone pulls and `dvc repro` runs nothing; experiments travel through a git
remote; an unreachable remote, a killed push and a corrupted object each end cleanly.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.services import SSHD, Sshd
from tests.conftest import small_repo

pytestmark = [pytest.mark.integration, pytest.mark.slow]
OUTS = ("data/raw/train-images-idx3-ubyte", "models/model.pt", "models/model.onnx", "models/model.int8.onnx")


def run(cwd: Path, *cmd: str, env: dict, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}{result.stderr}"
    return result


def dvc(cwd: Path, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return run(cwd, sys.executable, "-m", "dvc", *args, env=env, check=check)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not SSHD.exists():
        message = f"needs {SSHD}: apt-get install openssh-server (scripts/test.sh does, as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = Sshd(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


def add_remote(repo: Path, url: str, env: dict, name: str = "storage", key: Path | None = None,
               verify: bool = True) -> None:
    """What docs/team.md tells a team to run (the key only in .dvc/config.local, never committed);
    ``verify=False``: the remote as DVC makes it by default."""
    (repo / ".dvc" / "config.local").unlink(missing_ok=True)  # an earlier test's key
    dvc(repo, "remote", "add", "-d", "-f", name, url, env=env)
    if verify:
        dvc(repo, "remote", "modify", name, "verify", "true", env=env)  # pull checks every object's hash
    run(repo, "git", "commit", "-qm", f"DVC remote {name}", ".dvc/config", env=env)  # shared with the team
    if key is not None:
        dvc(repo, "remote", "modify", "--local", name, "keyfile", str(key), env=env)


def clone(source: Path, dest: Path, env: dict) -> Path:
    run(dest.parent, "git", "clone", "-q", str(source), str(dest), env=env)
    for args in (["user.name", "teammate"], ["user.email", "teammate@localhost"]):
        run(dest, "git", "config", *args, env=env)
    return dest


@pytest.fixture(scope="module")
def pusher(tmp_path_factory, mirror):
    """The clone that ran the pipeline (small params): its outs, cache and run-cache are full."""
    root = small_repo(tmp_path_factory.mktemp("pusher"))
    env = {**os.environ, "MNIST_MIRROR": str(mirror), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DVC_EXP_NAME", None)
    dvc(root, "repro", env=env)
    run(root, "git", "add", "-A", env=env)  # the git-tracked outs (metrics, reports, pictures) and dvc.lock
    run(root, "git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm",
        "pipeline run on small params", env=env)
    return root, env


def remote_objects(storage: Path) -> dict[str, bytes]:
    """{object path: bytes} of a DVC 3 remote (files/md5/xx/yyyy...)."""
    return {str(p.relative_to(storage)): p.read_bytes() for p in storage.rglob("*") if p.is_file()}


def damage_remote_object(storage: Path, content: bytes) -> Path:
    """Flip one byte in the middle of the remote's object holding ``content``; its path."""
    md5 = hashlib.md5(content).hexdigest()
    obj = storage / "files" / "md5" / md5[:2] / md5[2:]
    damaged = bytearray(obj.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    obj.chmod(0o644)
    obj.write_bytes(bytes(damaged))
    return obj


def assert_remote_complete(storage: Path) -> None:
    """Every object there holds the bytes its name (an MD5) says. DVC uploads each object to
    a hidden ``.<random>.tmp`` name and renames it when whole: a killed push leaves such a
    part-file behind, never a short object under its real name."""
    objects = [p for p in (storage / "files" / "md5").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert objects
    for p in objects:
        if not p.name.endswith(".dir"):
            assert hashlib.md5(p.read_bytes()).hexdigest() == p.parent.name + p.name, p


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_a_teammate_pulls_and_repro_runs_nothing(kind, pusher, sshd, tmp_path):
    root, env = pusher
    storage = tmp_path / "storage"
    url = sshd.url(storage) if kind == "ssh" else str(storage)
    add_remote(root, url, env, key=sshd.folder / "user_key" if kind == "ssh" else None)
    dvc(root, "push", "--run-cache", env=env)
    assert_remote_complete(storage)

    teammate = clone(root, tmp_path / "teammate", env)
    if kind == "ssh":  # the key is the teammate's own, kept out of git
        dvc(teammate, "remote", "modify", "--local", "storage", "keyfile", str(sshd.folder / "user_key"), env=env)
    t0 = time.perf_counter()
    dvc(teammate, "pull", env=env)
    print(f"dvc pull from the {kind} remote: {time.perf_counter() - t0:.1f} s")
    repro = dvc(teammate, "repro", env=env)
    assert "Running stage" not in repro.stdout, repro.stdout
    for out in OUTS:
        assert (teammate / out).read_bytes() == (root / out).read_bytes(), out
    assert run(teammate, "git", "status", "--porcelain", env=env).stdout == ""

    # `dvc repro --pull`, in another fresh clone: fetched as needed, still nothing runs
    third = clone(root, tmp_path / "third", env)
    if kind == "ssh":
        dvc(third, "remote", "modify", "--local", "storage", "keyfile", str(sshd.folder / "user_key"), env=env)
    repro = dvc(third, "repro", "--pull", env=env)
    assert "Running stage" not in repro.stdout, repro.stdout
    assert (third / "models/model.onnx").read_bytes() == (root / "models/model.onnx").read_bytes()


@pytest.fixture(scope="module")
def shared_experiment(pusher, tmp_path_factory):
    """The pusher's experiment ``shared-seed`` (train.seed=7), pushed to a git remote and a folder
    DVC remote; the pusher's workspace is back at its commit after. The bare git remote."""
    root, env = pusher
    base = tmp_path_factory.mktemp("shared")
    add_remote(root, str(base / "storage"), env)
    bare = base / "origin.git"
    run(base, "git", "init", "-q", "--bare", "--initial-branch=main", str(bare), env=env)
    run(root, "git", "remote", "add", "origin", str(bare), env=env)
    run(root, "git", "push", "-q", "origin", "HEAD:main", env=env)
    dvc(root, "exp", "run", "-n", "shared-seed", "-S", "train.seed=7", env=env)
    dvc(root, "exp", "push", "--run-cache", "origin", "shared-seed", env=env)  # commit to git; outs, run-cache: DVC
    back_to_head(root, env)
    return bare


def back_to_head(root: Path, env: dict) -> None:
    run(root, "git", "checkout", "--", ".", env=env)
    dvc(root, "checkout", env=env)


def test_experiments_travel_through_a_git_remote(pusher, shared_experiment, tmp_path):
    _, env = pusher
    teammate = clone(shared_experiment, tmp_path / "teammate", env)
    dvc(teammate, "exp", "pull", "origin", "shared-seed", env=env)
    shown = dvc(teammate, "exp", "show", "--no-pager", "--csv", env=env).stdout
    row = next(r for r in csv.DictReader(io.StringIO(shown)) if r["Experiment"] == "shared-seed")
    assert row["train.seed"] == "7"
    dvc(teammate, "exp", "apply", "shared-seed", env=env)
    dvc(teammate, "pull", env=env)  # the experiment's model, from the remote
    assert "Running stage" not in dvc(teammate, "repro", env=env).stdout


def test_params_trained_before_are_restored_from_the_run_cache_without_training(pusher, shared_experiment, tmp_path):
    """``dvc exp run`` with params a teammate already trained and pushed (``dvc exp push
    --run-cache``) takes the train stage from DVC's run-cache: it trains nothing and opens no
    MLflow run, in the clone that trained them and in another clone. Every out of the train
    stage is in DVC's cache (a ``cache: false`` one would keep it out of the run-cache)."""
    import sqlite3

    root, env = pusher
    runs = sqlite3.connect(root / "mlflow.db").execute("select count(*) from runs").fetchone()[0]
    try:
        again = dvc(root, "exp", "run", "-n", "again", "-S", "train.seed=7", "train", env=env)
        assert "Stage 'train' is cached - skipping run" in again.stdout, again.stdout
        assert "training " not in again.stdout  # what the train stage prints when it trains
        assert sqlite3.connect(root / "mlflow.db").execute("select count(*) from runs").fetchone()[0] == runs
    finally:
        back_to_head(root, env)

    teammate = clone(shared_experiment, tmp_path / "teammate", env)
    teammate_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{teammate / 'mlflow.db'}"}
    there = dvc(teammate, "exp", "run", "--pull", "-n", "mine", "-S", "train.seed=7", "train", env=teammate_env)
    assert "Stage 'train' is cached - skipping run" in there.stdout, there.stdout + there.stderr
    assert "training " not in there.stdout
    assert not (teammate / "mlflow.db").exists() or sqlite3.connect(teammate / "mlflow.db").execute(
        "select count(*) from runs").fetchone()[0] == 0  # no training, so no run of its own


def test_an_unreachable_remote_fails_clearly_and_the_next_push_completes(pusher, sshd, tmp_path):
    root, env = pusher
    storage = tmp_path / "storage"
    add_remote(root, sshd.url(storage), env, key=sshd.folder / "user_key")
    before = {out: (root / out).read_bytes() for out in OUTS}
    sshd.stop()
    try:
        failed = dvc(root, "push", "--run-cache", env=env, check=False)
    finally:
        sshd.start()
    assert failed.returncode != 0
    message = failed.stdout + failed.stderr
    assert "ERROR" in message and ("Connection refused" in message or "connect" in message.lower()), message
    assert {out: (root / out).read_bytes() for out in OUTS} == before  # nothing lost locally
    assert dvc(root, "status", env=env).stdout.strip().endswith("up to date.")
    dvc(root, "push", "--run-cache", env=env)
    assert "are in sync" in dvc(root, "status", "-c", env=env).stdout
    assert_remote_complete(storage)


def test_a_push_killed_half_way_completes_when_run_again(pusher, sshd, tmp_path):
    """Killed while the biggest object (47 MB of training images) is half on the remote."""
    root, env = pusher
    storage = tmp_path / "storage"
    add_remote(root, sshd.url(storage), env, key=sshd.folder / "user_key")
    dvc(root, "remote", "modify", "storage", "jobs", "1", env=env)
    big = (root / "data/raw/train-images-idx3-ubyte").read_bytes()
    md5 = hashlib.md5(big).hexdigest()
    push = subprocess.Popen([sys.executable, "-m", "dvc", "push", "--run-cache"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    folder = storage / "files" / "md5" / md5[:2]
    deadline = time.monotonic() + 300
    while not any(0 < p.stat().st_size < len(big) for p in (folder.iterdir() if folder.is_dir() else [])):
        assert push.poll() is None and time.monotonic() < deadline, "the push ended before it could be killed"
        time.sleep(0.002)
    os.killpg(push.pid, signal.SIGKILL)  # mid-file
    push.wait()
    assert "are in sync" not in dvc(root, "status", "-c", env=env, check=False).stdout
    dvc(root, "push", "--run-cache", env=env)
    assert "are in sync" in dvc(root, "status", "-c", env=env).stdout
    assert_remote_complete(storage)


def test_a_corrupted_object_on_the_remote_is_refused_on_pull(pusher, tmp_path):
    root, env = pusher
    storage = tmp_path / "storage"
    add_remote(root, str(storage), env)
    dvc(root, "push", env=env)
    onnx_md5 = hashlib.md5((root / "models/model.onnx").read_bytes()).hexdigest()
    damage_remote_object(storage, (root / "models/model.onnx").read_bytes())

    teammate = clone(root, tmp_path / "teammate", env)
    failed = dvc(teammate, "pull", env=env, check=False)
    assert failed.returncode != 0
    message = failed.stdout + failed.stderr
    assert "models/model.onnx" in message or onnx_md5 in message or "hash" in message.lower(), message
    assert not (teammate / "models/model.onnx").exists()  # the damaged bytes reach no workspace
    assert (teammate / "models/model.pt").read_bytes() == (root / "models/model.pt").read_bytes()

    good = (root / "models/model.onnx").read_bytes()  # the pusher's own copy is not overwritten
    dvc(root, "pull", env=env, check=False)
    assert (root / "models/model.onnx").read_bytes() == good


def test_a_damaged_object_pulled_without_verify_stops_training(pusher, tmp_path):
    """A folder remote as DVC makes it (no ``verify``): a byte flipped in the remote's copy of the
    training images reaches the teammate's data/raw, and DVC sees nothing wrong; the train stage
    refuses the file, naming it and both hashes, before any training or MLflow run."""
    from pipeline.data import FILES

    root, env = pusher
    storage = tmp_path / "storage"
    add_remote(root, str(storage), env, verify=False)
    dvc(root, "push", env=env)
    name = "train-images-idx3-ubyte"
    damage_remote_object(storage, (root / "data/raw" / name).read_bytes())

    teammate = clone(root, tmp_path / "teammate", env)
    dvc(teammate, "pull", env=env)  # rc 0
    damaged = (teammate / "data/raw" / name).read_bytes()
    assert damaged != (root / "data/raw" / name).read_bytes()
    assert dvc(teammate, "status", env=env).stdout.strip().endswith("up to date.")  # DVC can't tell
    failed = dvc(teammate, "repro", "--force", "--single-item", "train", env=env, check=False)
    assert failed.returncode != 0
    message = failed.stdout + failed.stderr
    assert "Running stage 'train'" in message and "training " not in failed.stdout, message
    [line] = [line for line in message.splitlines() if "is damaged" in line]
    assert line.startswith("stages.train: error: data/raw/train-images-idx3-ubyte is damaged"), line
    assert hashlib.sha256(damaged).hexdigest() in line and FILES[name] in line, line
