"""Atomic writes: whole files or none, with the mode a plain open() gives."""
from __future__ import annotations

import os
import stat

import pytest

from pipeline import atomic


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_mode_open_would_give(tmp_path, umask, mask, mode):
    """mkstemp's 0600 made every output unreadable to a teammate or a Triton container
    running as another user; the umask, not the writer, decides."""
    umask(mask)
    atomic.write_json(tmp_path / "metrics.json", {"a": 1})
    with open(tmp_path / "plain.txt", "w"):
        pass
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    final = tmp_path / "model.onnx"
    atomic.write_bytes(final, b"old")
    with pytest.raises(RuntimeError), atomic.atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert final.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_temporaries_left_by_a_killed_writer_are_cleaned_up(tmp_path):
    (tmp_path / ".out.json.dead00beef00.tmp").write_text("half")
    atomic.write_text(tmp_path / "out.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
