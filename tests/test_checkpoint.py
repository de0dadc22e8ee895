"""Killed training resumes bit-for-bit; checkpoints that can't be trusted are refused."""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint

DRIVER = Path(__file__).with_name("kill_driver.py")


def run_driver(raw_dir, ckpt, out, kill_at_report: int | None = None) -> int:
    """Exit code of the driver; with ``kill_at_report`` it gets SIGKILL as soon as it has
    reported that many more training steps (every 20 steps), wherever it then is: mid-step,
    mid-checkpoint-write. Kill points are steps the test sees, never times, so a busy
    machine can't make a run finish before its kill."""
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(raw_dir), str(ckpt), str(out)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    if kill_at_report is not None:
        reports = 0
        for line in proc.stdout:
            reports += line.startswith("step ")
            if reports == kill_at_report:
                proc.send_signal(signal.SIGKILL)
                break
    proc.stdout.read()
    return proc.wait(timeout=300)


@pytest.mark.integration
def test_sigkill_at_random_points_then_resume_gives_identical_weights(raw_dir, tmp_path):
    assert run_driver(raw_dir, tmp_path / "none", tmp_path / "straight.pt") == 0
    ckpt = tmp_path / "ckpt" / "train.ckpt"
    rng = random.Random(1234)
    # 128 steps, a report every 20 (and at each epoch's end), a checkpoint every 3: three kills
    # of at most 2 reports each stop by step 104, so each lands mid-training, after a checkpoint
    for _ in range(3):
        code = run_driver(raw_dir, ckpt, tmp_path / "resumed.pt", kill_at_report=rng.randint(1, 2))
        assert code == -signal.SIGKILL and not (tmp_path / "resumed.pt").exists()
        assert ckpt.exists()  # the next run resumes rather than starting over
    assert run_driver(raw_dir, ckpt, tmp_path / "resumed.pt") == 0
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
