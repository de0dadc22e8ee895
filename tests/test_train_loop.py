"""The training-speed benchmark runs each loop in its own process, set up as that loop runs."""
import sys

import pytest

from benchmarks import train_loop

pytestmark = pytest.mark.integration  # starts processes or servers, trains or exports


def test_each_loop_runs_in_a_fresh_process_and_ratios_are_printed(raw_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_loop", "--raw", str(raw_dir), "--images", "64", "--repeats", "1"])
    train_loop.main()
    out = capsys.readouterr().out
    assert "repeat 1: reference" in out and "reference, memory kept" in out
    last = out.strip().splitlines()[-1]
    assert "ratio" in last and "the reference with memory kept" in last


def test_a_failing_run_is_reported_with_its_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_loop", "--raw", str(tmp_path / "missing"), "--images", "64"])
    try:
        train_loop.main()
    except SystemExit as e:
        assert "the 'reference' run failed" in str(e) and "missing" in str(e)
    else:
        raise AssertionError("a missing data folder must fail the benchmark")
