"""Atomic file writes: a killed process never leaves a half-written file at a final path.

Everything is written to a temporary file in the destination's own folder (same file
system, so the rename is atomic), flushed and fsynced, then renamed over the final path.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it into place.

    The caller writes the whole file to the yielded path (with any library). If the body
    raises, the temporary file is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may not have synced: do it before the rename
            os.fsync(f.fileno())
        os.replace(tmp, final)
        for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by a writer that was killed
            stale.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | os.PathLike, text: str) -> None:
    write_bytes(final, text.encode())


def write_json(final: str | os.PathLike, obj) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=False) + "\n")
