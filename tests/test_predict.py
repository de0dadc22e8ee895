"""python -m stages.predict: image files in, digits out; a bad file is reported, the rest still run."""
import json
import subprocess
import sys

from PIL import Image

from tests.conftest import REPO


def test_predict_reads_pictures_and_reports_bad_files(served_model, test_split, tmp_path):
    images, labels = test_split
    files = []
    for i in range(6):
        path = tmp_path / f"digit{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(255 - images[i]).resize((64 + 30 * i, 64 + 30 * i)).save(path)  # dark on white, any size
        files.append(path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    r = subprocess.run([sys.executable, "-m", "stages.predict", "--model", str(served_model), "--json",
                        *map(str, files), str(broken)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1  # one file could not be read
    assert "broken.png: error:" in r.stderr and "Traceback" not in r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["file"] for row in rows] == [str(f) for f in files]
    assert sum(row["digit"] == labels[i] for i, row in enumerate(rows)) >= 5
    assert all(abs(sum(row["probabilities"]) - 1) < 1e-4 for row in rows)

    plain = subprocess.run([sys.executable, "-m", "stages.predict", "--model", str(served_model), str(files[0])],
                           cwd=REPO, capture_output=True, text=True, check=True)
    assert plain.stdout.startswith(f"{files[0]}: {rows[0]['digit']} (")
