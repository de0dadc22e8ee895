"""Stage summary: the run's headline metrics (pipeline/headline.py), from every stage's report, as
DVC's metrics (metrics/fp32.json, int8.json, train.json: one row each in dvc metrics show) and
as the MLflow run's metrics; the run is marked finished."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline import atomic, headline
from stages import _cli
from tracking.run import Tracker


def main(args: argparse.Namespace) -> None:
    reports = {name: json.loads(getattr(args, name).read_text())
               for name in ("train", "evaluate", "quantize", "verify", "benchmark")}
    values = headline.grid(**reports)
    for row in headline.ROWS:
        atomic.write_json(getattr(args, f"{row}_out"), values[row])
    tracker = Tracker.resume(args.run_id)
    tracker.log_metrics(headline.flat(values))
    # dvc.lock as DVC has written it so far: the hashes of the data, params, code and models every
    # earlier stage of this run used (DVC adds this stage's own entry after it ends).
    tracker.log_artifact(args.lock, "dvc")
    tracker.finish()
    print("\n".join(headline.summary(values)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.summary", description=__doc__)
    parser.add_argument("--run-id", type=Path, required=True, help="file holding the MLflow run id")
    for name in ("train", "evaluate", "quantize", "verify", "benchmark"):
        parser.add_argument(f"--{name}", type=Path, required=True, help=f"the {name} stage's report (JSON)")
    for row in headline.ROWS:
        parser.add_argument(f"--{row}-out", type=Path, required=True, help=f"out: the {row} row of the metrics")
    parser.add_argument("--lock", type=Path, required=True, help="dvc.lock, logged to the MLflow run")
    _cli.run(main, parser)
