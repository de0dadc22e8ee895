"""Atomic file writes: a killed process never leaves a half-written file at a final path.

Everything is written to a temporary file in the destination's own folder (same file
system, so the rename is atomic), flushed and fsynced, then renamed over the final path, and
the folder is fsynced so the rename itself survives a crash. The file gets the mode a plain
``open()`` would give it (0666 less the user's umask), so teammates, a shared DVC cache or a
Triton container running as another user can read what the pipeline writes.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it into place.

    The caller writes the whole file to the yielded path (with any library). If the body
    raises, the temporary file is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{secrets.token_hex(6)}.tmp"
    # O_EXCL: never follow or reuse what is there; 0o666: the kernel applies the umask (mkstemp's 0600 would not)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may not have synced: do it before the rename
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by a writer that was killed
            stale.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | os.PathLike, text: str) -> None:
    write_bytes(final, text.encode())


def write_json(final: str | os.PathLike, obj) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=False) + "\n")
