"""benchmarks/load.py, briefly: concurrent clients, zero errors, slow-loris attackers that cost
valid requests nothing, the memory worst case under 1 GB, overload answered by fast 503s."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration  # starts processes or servers, trains or exports


def test_load_script_reports_latency_memory_attacks_and_fast_rejections(served_model, raw_dir, tmp_path):
    out = tmp_path / "load.json"
    subprocess.run([sys.executable, "-m", "benchmarks.load", "--model", str(served_model), "--data", str(raw_dir),
                    "--clients", "16", "--seconds", "4", "--scenarios", "json,slowloris,memory",
                    "--overload-concurrency", "2", "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    r = json.loads(out.read_text())
    load, attacked, memory, overload = r["json"], r["slowloris"], r["memory"], r["overload"]
    assert load["ok"] > 100 and load["error_count"] == 0 and load["rejected_503"] == 0
    assert load["wrong_answers"] < 0.1 * load["ok"]  # real digits, checked against their labels
    assert load["p50_ms"] <= load["p99_ms"] and load["rss_max_mb"] < 500
    assert load["server_exit_code"] == 0  # graceful stop after the run
    # 100 slow-loris connections: valid requests are all served, none turned away
    assert attacked["ok"] > 100 and attacked["rejected_503"] == 0 and attacked["error_count"] == 0
    # 64 uploads of 16 MiB at once, three times: bounded by the body budget, not by the clients
    assert memory["rss_max_mb"] < 1024 and memory["statuses"].get("HTTP 503", 0) + sum(
        n for k, n in memory["statuses"].items() if "Reset" in k or "Broken" in k) > 0
    # and a client sending single digits meanwhile, and on the quiet server before: both measured
    assert memory["probe_quiet"]["ok"] > 0 and memory["probe_burst"]["ok"] + memory["probe_burst"]["rejected_503"] > 0
    # 16 clients, 2 places: the rest are turned away at once, and nothing times out.
    assert overload["rejected_503"] > 0 and overload["error_count"] == 0 and overload["ok"] > 0
    assert overload["rejected_p99_ms"] < 2000
    assert int(r["machine"]["cores"]) >= 1  # the machine record names the CPU it ran on
