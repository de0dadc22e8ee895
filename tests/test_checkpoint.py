"""Killed training resumes bit-for-bit; checkpoints that can't be trusted are refused."""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint

DRIVER = Path(__file__).with_name("kill_driver.py")


def run_driver(raw_dir, ckpt, out, kill_after: float | None = None) -> tuple[int, float]:
    """Exit code, and seconds from 'ready' (data loaded) to exit."""
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(raw_dir), str(ckpt), str(out)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    if kill_after is not None:
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=300), time.monotonic() - t0


def test_sigkill_at_random_points_then_resume_gives_identical_weights(raw_dir, tmp_path):
    code, duration = run_driver(raw_dir, tmp_path / "none", tmp_path / "straight.pt")
    assert code == 0  # kill points are drawn from inside the training time of a whole run
    ckpt = tmp_path / "ckpt" / "train.ckpt"
    rng = random.Random(1234)
    for _ in range(3):  # three kills within the first part of the run: each lands mid-training
        code, _ = run_driver(raw_dir, ckpt, tmp_path / "resumed.pt", kill_after=rng.uniform(0.0, duration / 3))
        assert code == -signal.SIGKILL and not (tmp_path / "resumed.pt").exists()
    assert run_driver(raw_dir, ckpt, tmp_path / "resumed.pt")[0] == 0
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not ckpt.exists()  # a finished run leaves no checkpoint behind
    assert not [p for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")]


def test_roundtrip_and_fingerprint(tmp_path):
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, {"fingerprint": "f1", "w": torch.arange(3)})
    assert torch.equal(checkpoint.load(path, "f1")["w"], torch.arange(3))
    with pytest.raises(checkpoint.CheckpointError, match="belongs to a run with other params"):
        checkpoint.load(path, "f2")
    assert checkpoint.load(tmp_path / "absent.ckpt", "f1") is None


def test_tampered_and_truncated_checkpoints_are_refused(tmp_path):
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, {"fingerprint": "f", "w": torch.ones(100)})
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256 mismatch"):
        checkpoint.load(path, "f")
    path.write_bytes(bytes(blob[:20]))
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint of this project"):
        checkpoint.load(path, "f")


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch EXPLOITED",))


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"fingerprint": "f", "x": Exploit()})
    # a well-formed checkpoint file (right magic, right digest) around a malicious pickle
    path = tmp_path / "evil.ckpt"
    path.write_bytes(checkpoint.MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with pytest.raises(checkpoint.CheckpointError, match="refused to load"):
        checkpoint.load(path, "f")
    assert not (tmp_path / "EXPLOITED").exists()
