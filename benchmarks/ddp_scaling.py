"""Two processes with one thread each (torchrun + DDP, gloo) against one process with two
threads, on this machine's CPUs, measured side by side in one run.

    python -m benchmarks.ddp_scaling [--subset 20000] [--epochs 2] [--repeats 2]

Runs the train stage with the project's params (the full network) on --subset training
images, alternately as 1 process x 2 threads and 2 processes x 1 thread, --repeats times
each, and prints the training speed of each (images/s over the epochs after the first, the
stage's own figure) and their ratio. Only the ratio compares: the machine's speed drifts.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from harness.services import REPO
from pipeline.machine import hardware

SETUPS = {"1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}


def speed(folder: Path, data: Path) -> float:
    args = ["--data", str(data), "--model", "model.pt", "--metrics", "train.json", "--plots", "train.csv",
            "--run-id", "run_id", "--checkpoint", "train.ckpt"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "PYTHONPATH": str(REPO),
           "MLFLOW_SPOOL_DIR": str(folder / "spool"), "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run([sys.executable, "-m", "stages.train", *args], cwd=folder, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"ddp_scaling: the train stage failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return json.loads((folder / "train.json").read_text())["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ddp_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--subset", type=int, default=20000, help="training images per epoch")
    p.add_argument("--epochs", type=int, default=2, help="the first pays for warm-up and is not counted")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data", type=Path, default=REPO / "data/raw")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.epochs < 2:
        p.error("--epochs must be >= 2: the stage's speed leaves out the first epoch")
    results: dict[str, list[float]] = {name: [] for name in SETUPS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, (processes, threads) in SETUPS.items():
                folder = Path(tmp) / f"{i}-{processes}"
                folder.mkdir()
                params = yaml.safe_load((REPO / "params.yaml").read_text())
                params["train"].update(subset=args.subset, epochs=args.epochs, processes=processes, threads=threads,
                                       checkpoint_every=0)
                (folder / "params.yaml").write_text(yaml.safe_dump(params))
                print(f"run {i + 1}/{args.repeats}: {name} ...", file=sys.stderr, flush=True)
                results[name].append(speed(folder, args.data.resolve()))
    for name, speeds in results.items():
        print(f"{name:24} {' '.join(f'{s:7.0f}' for s in speeds)} images/s")
    one, two = (statistics.median(results[n]) for n in SETUPS)
    print(f"2 processes x 1 thread / 1 process x 2 threads: {two / one:.2f} (medians) on "
          f"{hardware().get('cpu')}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
