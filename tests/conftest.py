"""Shared fixtures: the real MNIST from the local mirror, tiny models, a repo copy for DVC."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import data

REPO = Path(__file__).resolve().parents[1]
LOCAL_MIRROR = Path(os.environ.get("MNIST_MIRROR") or REPO.parent / "shared" / "mnist")


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (LOCAL_MIRROR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.fail(f"no MNIST mirror at {LOCAL_MIRROR}: set MNIST_MIRROR to a folder of the four .gz files")
    return LOCAL_MIRROR


@pytest.fixture(scope="session")
def raw_dir(mirror, tmp_path_factory) -> Path:
    """The four verified IDX files, downloaded once per test session from the local mirror."""
    dest = tmp_path_factory.mktemp("raw")
    data.download(dest, (str(mirror),), data.DownloadConfig())
    return dest


@pytest.fixture(scope="session")
def test_split(raw_dir) -> tuple[np.ndarray, np.ndarray]:
    return data.load_split(raw_dir, "test")


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(os.cpu_count() or 1)


def copy_repo(dest: Path) -> Path:
    """A fresh git repository holding this checkout's files (committed or not, minus ignored)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for args in (["init", "-q"], ["config", "user.name", "test"], ["config", "user.email", "test@localhost"],
                 ["add", "-A"],
                 ["-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "copy"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest
