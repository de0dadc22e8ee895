"""Stage card: the model card (reports/model_card.md) from the metrics files and the model's own
metadata, linked to the pictures the evaluate stage drew; logged to the MLflow run."""
from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from pipeline import atomic, bench, card, runtime
from pipeline.model import ModelConfig
from stages import _cli
from tracking.run import Tracker


def main(args: argparse.Namespace) -> None:
    architecture = _cli.section(ModelConfig, "model").describe()  # the params the model was trained with
    bench_config = _cli.section(bench.BenchConfig, "benchmark")  # the bounds its rows were flagged by
    model = runtime.load_checked(args.model)
    metrics = {name: json.loads(path.read_text()) for name, path in
               (("train", args.train), ("evaluate", args.evaluate), ("quantize", args.quantize),
                ("benchmark", args.benchmark))}
    with args.confusion.open() as f:
        rows = [(int(r["actual"]), int(r["predicted"])) for r in csv.DictReader(f)]
    actual, predicted = np.array(rows).T
    pictures = {"confusion": args.confusion_png, "misclassified": args.misclassified}

    def page(links: dict[str, str]) -> str:
        return card.render(card.CardInputs(
            metadata=runtime.metadata(model), sha256=runtime.sha256(args.model), architecture=architecture,
            onnx_bytes=args.model.stat().st_size, actual=actual, predicted=predicted, pictures=links,
            bench_config=bench_config, **metrics))

    # in the repository the card links to the evaluate stage's pictures; in MLflow, to copies beside it
    atomic.write_text(args.out, page({k: Path(os.path.relpath(p, args.out.parent)).as_posix()
                                      for k, p in pictures.items()}))
    tracker = Tracker.resume(args.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / args.out.name).write_text(page({k: p.name for k, p in pictures.items()}))
        for path in (Path(tmp) / args.out.name, *pictures.values()):
            tracker.log_artifact(path, "card")
    print(f"card: wrote {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.card", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model.onnx")
    parser.add_argument("--run-id", type=Path, required=True, help="file holding the MLflow run id")
    for name in ("train", "evaluate", "quantize", "benchmark"):
        parser.add_argument(f"--{name}", type=Path, required=True, help=f"the {name} stage's metrics (JSON)")
    parser.add_argument("--confusion", type=Path, required=True, help="per test image: actual,predicted (CSV)")
    parser.add_argument("--confusion-png", type=Path, required=True, help="the confusion matrix picture")
    parser.add_argument("--misclassified", type=Path, required=True, help="the misclassified digits picture")
    parser.add_argument("--out", type=Path, required=True, help="out: the model card (Markdown)")
    _cli.run(main, parser)
