"""Stage evaluate: onnxruntime accuracy on the 10,000 test images, confusion matrix, mistakes."""
from __future__ import annotations

import argparse
import io
from pathlib import Path

from pipeline import atomic, data, evaluate, figures, runtime
from stages import _cli
from tracking import datasets
from tracking.run import Tracker


def main(args: argparse.Namespace) -> None:
    cfg = _cli.section(evaluate.EvaluateConfig, "evaluate")
    images, labels = data.load_split(args.data, "test")
    model = runtime.load_checked(args.model)
    session = runtime.open_session(model, "cpu")
    logits = evaluate.predict_logits(session, images, cfg.batch_size)
    report = {**evaluate.accuracy_report(labels, logits), "provider": session.label}
    predicted = logits.argmax(1)
    confidence = evaluate.softmax(logits).max(1)

    atomic.write_json(args.metrics, report)
    rows = io.StringIO()
    rows.write("actual,predicted\n")
    rows.writelines(f"{a},{p}\n" for a, p in zip(labels, predicted))
    atomic.write_text(args.confusion, rows.getvalue())
    figures.confusion_png(evaluate.confusion_matrix(labels, predicted), args.confusion_png)
    figures.misclassified_grid(images, labels, predicted, confidence, args.misclassified,
                               cfg.misclassified_shown)

    tracker = Tracker.resume(args.run_id)
    test_set = datasets.mnist("test", runtime.metadata(model)["data_md5"])  # the bytes the model was made from
    tracker.log_metrics(evaluate.model_metrics(report), model="fp32", dataset=test_set)
    tracker.tag_model_versions({"eval_accuracy": report["accuracy"], "eval_errors": report["errors"]})
    tracker.champion_if_none()  # the first version evaluated: models:/<name>@champion exists from then on
    for path in (args.confusion_png, args.misclassified, args.metrics):
        tracker.log_artifact(path, "evaluate")
    tracker.finish()
    print(f"onnxruntime ({session.label}) test accuracy {report['accuracy']:.4f} "
          f"({report['errors']} errors in {report['images']:,} images)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.evaluate", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model.onnx")
    parser.add_argument("--data", type=Path, required=True, help="folder of the IDX files")
    parser.add_argument("--run-id", type=Path, required=True, help="file holding the MLflow run id")
    parser.add_argument("--metrics", type=Path, required=True, help="out: accuracy report (JSON)")
    parser.add_argument("--confusion", type=Path, required=True, help="out: actual,predicted CSV (DVC plot)")
    parser.add_argument("--confusion-png", type=Path, required=True, help="out: confusion matrix picture")
    parser.add_argument("--misclassified", type=Path, required=True, help="out: misclassified digits picture")
    _cli.run(main, parser)
