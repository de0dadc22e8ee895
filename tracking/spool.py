"""Operations MLflow could not take, kept on disk in order, and their replay.

One journal per run, ``<spool dir>/<run key>.jsonl``, one operation a line, with copies of the
files the operations name (the bytes as they were when logged). A file lock serialises
every process that reads or rewrites the spool (parallel DVC experiments share it). A run
that MLflow could not create has a ``pending-...`` key; replay creates it and records in
``ids.json`` which real run it became.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline import atomic
from tracking import ops, store

PENDING = "pending-"  # prefix of a run key that MLflow has not given an id yet


@contextlib.contextmanager
def _locked() -> Iterator[Path]:
    """The spool folder, held by this process alone until the block ends."""
    folder = store.spool_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ids() -> dict[str, str]:
    """{pending key: the run id replay gave it}."""
    path = store.spool_dir() / "ids.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def add(key: str, op: dict) -> None:
    """Append ``op`` to the journal of run ``key``, with copies of the files it names."""
    with _locked() as folder:
        for field in ops.FILE_FIELDS:  # keep the bytes as they are now
            if field in op:
                src = Path(op[field])
                dest = folder / "files" / uuid.uuid4().hex / src.name
                dest.parent.mkdir(parents=True)
                shutil.copyfile(src, dest)
                op = {**op, field: str(dest)}
        with open(folder / f"{key}.jsonl", "a") as f:  # a journal: appended under the lock
            f.write(json.dumps(op) + "\n")


def pending_keys() -> list[str]:
    folder = store.spool_dir()
    return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def replay(log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> tuple[dict[str, int], bool]:
    """Apply every spooled operation, oldest journal first; returns ({run key: operations
    applied}, whether the spool is now empty).

    Stops at the first failure and keeps the rest for next time; what was applied is removed
    at once, so a replay that dies midway never applies anything twice.
    """
    done: dict[str, int] = {}
    with _locked() as folder:
        known = ids()
        for journal in sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime):
            key = journal.stem
            lines = journal.read_text().splitlines()
            run_id = known.get(key) or (None if key.startswith(PENDING) else key)
            applied = 0
            try:
                for i, line in enumerate(lines):
                    op = json.loads(line)
                    new_id = ops.apply(op, run_id)
                    if op["op"] == "create_run" and new_id is not None:
                        run_id = known[key] = new_id
                        atomic.write_json(folder / "ids.json", known)
                    atomic.write_text(journal, "".join(f"{rest}\n" for rest in lines[i + 1:]))
                    applied += 1
            except Exception as e:  # noqa: BLE001 - kept for the next replay
                log(f"warning: MLflow: replay of {key} stopped after {applied} operations: {type(e).__name__}: {e}")
                done[key] = applied
                return done, False  # the store is not answering: the other journals can wait too
            journal.unlink()
            for op in map(json.loads, lines):
                for field in ops.FILE_FIELDS:
                    if field in op and Path(op[field]).is_relative_to(folder / "files"):
                        shutil.rmtree(Path(op[field]).parent, ignore_errors=True)
            done[key] = applied
            log(f"MLflow: replayed {applied} spooled operations into run {run_id}")
    return done, True
