"""What logging to the team's MLflow server costs a training run, against the sqlite file.

    python -m benchmarks.tracking_overhead [--epochs 4] [--repeats 1] [--data data/raw]

Starts the team server (python -m tracking.server: PostgreSQL, proxied artifacts, logins) on
127.0.0.1, then runs the train stage with the project's params, --epochs epochs, alternately
against a fresh sqlite store and against the server, --repeats times each. The stage
reports the wall time it spent in tracking calls (importing MLflow and creating the run with
its params, "opening"; then per-epoch metrics and the system-metrics monitor); that figure
and its share of the training time are compared side by side. Training time itself drifts
between runs, so only the logging seconds and their share are the comparison; the wall
times are printed for context.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from harness.services import REPO, TeamServer
from pipeline.machine import hardware


def train_once(workdir: Path, data: Path, env: dict[str, str]) -> dict[str, float]:
    """One run of the train stage in ``workdir``; its wall time, training time and logging time."""
    for out in ("model.pt", "train.json", "train.csv", "run_id"):
        (workdir / out).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "stages.train", "--data", str(data), "--model", "model.pt", "--metrics",
           "train.json", "--plots", "train.csv", "--run-id", "run_id", "--checkpoint", "train.ckpt"]
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=workdir, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        sys.exit(f"tracking_overhead: the train stage failed:\n{result.stderr[-3000:]}")
    if "warning: MLflow" in result.stderr:
        sys.exit(f"tracking_overhead: MLflow did not take every call:\n{result.stderr[-3000:]}")
    logging, opening = re.findall(r"logging to MLflow took ([\d.]+) s \(([\d.]+) s opening", result.stdout)[-1]
    epochs = list(csv.DictReader((workdir / "train.csv").open()))
    return {"wall_s": wall, "train_s": sum(float(r["seconds"]) for r in epochs), "logging_s": float(logging),
            "opening_s": float(opening)}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tracking_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="runs per store, alternated")
    p.add_argument("--data", type=Path, default=REPO / "data/raw", help="the four IDX files (dvc repro makes them)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    if not (args.data / "train-images-idx3-ubyte").is_file():
        sys.exit(f"tracking_overhead: no MNIST in {args.data}: run `dvc repro download` first")

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["epochs"] = args.epochs
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    runs: dict[str, list[dict[str, float]]] = {"sqlite": [], "server": []}
    with TeamServer() as server, tempfile.TemporaryDirectory() as tmp:
        for store in runs:
            (Path(tmp) / store).mkdir()
            (Path(tmp) / store / "params.yaml").write_text(yaml.safe_dump(params))
        envs = {"sqlite": {**base, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/sqlite/mlflow.db"},
                "server": {**base, **server.admin_env}}
        for i in range(args.repeats):
            for store in runs:
                print(f"run {i + 1}/{args.repeats} against {store} ...", file=sys.stderr, flush=True)
                runs[store].append(train_once(Path(tmp) / store, args.data.resolve(), envs[store]))

    print(f"{'store':8} {'wall s':>8} {'train s':>8} {'logging s':>10} {'opening':>8} {'share':>7}")
    summary = {}
    for store, rows in runs.items():
        for r in rows:
            print(f"{store:8} {r['wall_s']:8.1f} {r['train_s']:8.1f} {r['logging_s']:10.2f} {r['opening_s']:8.2f} "
                  f"{r['logging_s'] / r['train_s']:7.2%}")
        summary[store] = {"logging_s": statistics.median(r["logging_s"] for r in rows),
                          "share_of_training": statistics.median(r["logging_s"] / r["train_s"] for r in rows)}
    extra = summary["server"]["logging_s"] - summary["sqlite"]["logging_s"]
    print(f"the server costs {extra:+.2f} s of logging against sqlite over {args.epochs} epochs "
          f"({summary['server']['share_of_training']:.2%} vs {summary['sqlite']['share_of_training']:.2%} "
          f"of training time) on {hardware().get('cpu', 'this CPU')}")
    if args.out:
        args.out.write_text(json.dumps({"epochs": args.epochs, "runs": runs, "summary": summary,
                                        "hardware": hardware()}, indent=2))


if __name__ == "__main__":
    main()
