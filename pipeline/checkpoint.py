"""Training checkpoints that are safe to load and can't be half-written.

A checkpoint is one file: a magic line, the SHA-256 of the payload, then the payload saved
by ``torch.save``. It is written atomically (pipeline.atomic), read back only if the digest
matches, and unpickled with ``weights_only=True``, which refuses any object that would run
code. It also records a fingerprint of the run's configuration, so a checkpoint of another
run is never resumed.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from pipeline import atomic
from pipeline.errors import PipelineError

MAGIC = b"MNIST-ONNX-CHECKPOINT-1\n"


class CheckpointError(PipelineError, ValueError):
    """A checkpoint that is damaged, unsafe, or not of this run."""


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    atomic.write_bytes(path, MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def load(path: str | os.PathLike, fingerprint: str) -> dict[str, Any] | None:
    """The state saved at ``path``, or None if there is none; CheckpointError if it can't be trusted."""
    path = Path(path)
    if not path.is_file():
        return None
    blob = path.read_bytes()
    head = len(MAGIC) + 64 + 1
    if not blob.startswith(MAGIC) or len(blob) < head:
        raise CheckpointError(f"{path} is not a checkpoint of this project (or is truncated); delete it to start over")
    digest, payload = blob[len(MAGIC):head - 1].decode(errors="replace"), blob[head:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path}: SHA-256 mismatch, the file was changed after it was written; "
                              "delete it to start over")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle raises many kinds; all mean "refused"
        raise CheckpointError(f"{path}: refused to load ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{path} belongs to a run with other params or data; delete it to start over")
    return state


def fingerprint(*parts: Any) -> str:
    """A stable digest of the things that make two runs the same run."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()
