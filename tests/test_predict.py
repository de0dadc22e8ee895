"""python -m commands.predict: image files in, digits out; a bad file is reported, the rest still run."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import REPO


@pytest.mark.integration
def test_predict_reads_pictures_and_reports_bad_files(served_model, test_split, tmp_path):
    images, labels = test_split
    files = []
    for i in range(6):
        path = tmp_path / f"digit{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(255 - images[i]).resize((64 + 30 * i, 64 + 30 * i)).save(path)  # dark on white, any size
        files.append(path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    r = subprocess.run([sys.executable, "-m", "commands.predict", "--model", str(served_model), "--json",
                        *map(str, files), str(broken)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1  # one file could not be read
    assert "broken.png: error:" in r.stderr and "Traceback" not in r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["file"] for row in rows] == [str(f) for f in files]
    assert sum(row["digit"] == labels[i] for i, row in enumerate(rows)) >= 5
    assert all(abs(sum(row["probabilities"]) - 1) < 1e-4 for row in rows)

    plain = subprocess.run([sys.executable, "-m", "commands.predict", "--model", str(served_model), str(files[0])],
                           cwd=REPO, capture_output=True, text=True, check=True)
    assert plain.stdout.startswith(f"{files[0]}: {rows[0]['digit']} (")


@pytest.mark.integration
def test_an_endless_or_huge_file_is_refused_with_a_message(served_model, tmp_path):
    """/dev/zero was read until MemoryError and printed 'error: ' with nothing after it."""
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(17 * 2**20))  # over serve.max_body_bytes (16 MiB)
    r = subprocess.run([sys.executable, "-m", "commands.predict", "--model", str(served_model),
                        "/dev/zero", str(big), str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert "/dev/zero: error: larger than the limit of 16,777,216 bytes (serve.max_body_bytes)" in lines
    assert f"{big}: error: larger than the limit of 16,777,216 bytes (serve.max_body_bytes)" in lines
    assert any(line.startswith(f"{tmp_path}: error: ") and line.split("error: ")[1] for line in lines)


def test_an_error_without_a_message_is_named_by_its_kind():
    from stages import _cli
    assert _cli.describe(MemoryError()) == "MemoryError"
    assert _cli.describe(ValueError("bad")) == "bad"
