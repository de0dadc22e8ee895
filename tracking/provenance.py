"""What a run records about the code and the machine: git commit, dirtiness, versions."""
from __future__ import annotations

import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def git_tags(exclude: tuple[os.PathLike | str, ...] = ()) -> dict[str, str]:
    """The commit, and whether the tree differs from it. ``exclude``: the calling stage's own
    git-tracked outputs, which DVC deletes before running it (they would make every run
    look dirty)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    pathspec = [".", *(f":(exclude){Path(p).as_posix()}" for p in exclude)]
    tags = {"git_commit": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no", "--", *pathspec)))}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def package_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"
