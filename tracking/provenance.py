"""What a run records about the code, the data and the machine: git commit, dirtiness,
DVC hashes, versions."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def git_tags(exclude: tuple[os.PathLike | str, ...] = ()) -> dict[str, str]:
    """The commit, and whether the code or params differ from it. The pipeline's outputs
    don't count: every output dvc.yaml declares (DVC deletes a stage's git-tracked outs
    before running it, and rewrites upstream ones), and ``exclude``."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    outputs = (*dvc_outputs(), "dvc.lock", *exclude)  # dvc.lock: DVC's record of those outputs
    pathspec = [".", *(f":(exclude){Path(p).as_posix()}" for p in outputs)]
    tags = {"git_commit": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no", "--", *pathspec)))}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def dvc_outputs(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Every path dvc.yaml declares as a stage's out, metric or plot (none without dvc.yaml)."""
    import yaml
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return []
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


def model_provenance(data: Path, run_key: str, training_device: str, params: dict) -> dict[str, str]:
    """Where a model came from, for its file: code (git), data and params (their DVC-style
    hashes), the MLflow run, the training device and the exporting library versions.
    Nothing here changes between two exports of the same inputs."""
    import onnx
    import torch
    git = git_tags()
    return {"git_commit": git["git_commit"], "git_dirty": git["git_dirty"], "mlflow_run_id": run_key,
            "data_md5": dvc_md5(data), "params_md5": params_md5(params), "params_sections": ",".join(sorted(params)),
            "training_device": training_device, "torch_version": torch.__version__,
            "onnx_version": onnx.__version__}


def package_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def dvc_md5(path: os.PathLike | str) -> str:
    """DVC 3's hash of a file or folder, as dvc.lock records it (a folder's ends in ``.dir``),
    computed by DVC's own library from the bytes there now."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as staging:
        _, _, obj = build(HashFileDB(fs, staging), os.fspath(Path(path).resolve()), fs, "md5")
    assert obj is not None and obj.hash_info.value, f"DVC built no hash for {path}"
    return obj.hash_info.value


def params_md5(sections: dict) -> str:
    """MD5 of params sections as canonical JSON (keys sorted): the same values, the same hash."""
    return hashlib.md5(json.dumps(sections, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run_name(params: dict, exp_name: str | None) -> str:
    """A name a person recognises for a training's MLflow run: the DVC experiment's, else the
    params that differ from the commit's (``epochs=6 lr=0.002``), else the commit (``at 15bf3c4``)."""
    if exp_name:
        return exp_name
    import yaml
    try:
        committed = yaml.safe_load(subprocess.run(["git", "show", "HEAD:params.yaml"], capture_output=True, text=True,
                                                  timeout=10, check=True).stdout) or {}
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError, yaml.YAMLError):
        return "uncommitted"
    changed = changed_params(params, {k: committed.get(k) for k in params})
    return " ".join(f"{k}={v}" for k, v in changed.items())[:200] if changed else f"at {commit}"


def changed_params(params: dict, committed: dict) -> dict:
    """{leaf key: value} of every param in ``params`` (sections of params.yaml) that differs from
    ``committed``; a key is written as ``section.key`` where its leaf name alone is ambiguous."""
    from pipeline.params import flatten
    now, then = flatten(params), flatten({k: v for k, v in committed.items() if isinstance(v, dict)})
    diff = {k: v for k, v in now.items() if then.get(k) != v}
    leaves = [k.rsplit(".", 1)[-1] for k in now]
    return {(k.rsplit(".", 1)[-1] if leaves.count(k.rsplit(".", 1)[-1]) == 1 else k): v for k, v in diff.items()}
