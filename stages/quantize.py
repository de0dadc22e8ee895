"""Stage quantize: the static INT8 (QDQ) model, calibrated on training digits, with its accuracy."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import atomic, contract, data, evaluate, quantize, runtime
from stages import _cli
from tracking.run import Tracker


def main(args: argparse.Namespace) -> None:
    cfg = _cli.section(quantize.QuantizeConfig, "quantize")
    models = {"fp32": runtime.load_checked(args.model)}  # a clear error for a missing or broken file, first
    train_x, _ = data.load_split(args.data, "train")
    print(f"quantize: calibrating INT8 ranges on {cfg.calibration_images} training digits ...", flush=True)
    quantize.quantize_int8(args.model, args.out, contract.to_input(train_x[:cfg.calibration_images]))
    models["int8"] = runtime.load_checked(args.out)
    test_x, test_y = data.load_split(args.data, "test")
    print(f"quantize: test accuracy of both models on {len(test_x):,} digits ...", flush=True)
    accuracy = {}
    for name, proto in models.items():
        session = runtime.open_session(proto, "cpu")
        logits = evaluate.predict_logits(session, test_x, 1000)
        accuracy[name] = evaluate.accuracy_report(test_y, logits)["accuracy"]
    report = {"fp32_accuracy": accuracy["fp32"], "int8_accuracy": accuracy["int8"],
              "int8_accuracy_delta": accuracy["int8"] - accuracy["fp32"],
              "calibration_images": cfg.calibration_images, "int8_onnx_bytes": args.out.stat().st_size}
    atomic.write_json(args.metrics, report)
    Tracker.resume(args.run_id).log_metrics({k: v for k, v in report.items() if k != "calibration_images"})
    print(f"{args.out}: {report['int8_onnx_bytes'] / 1e6:.1f} MB; test accuracy INT8 {accuracy['int8']:.4f} "
          f"vs FP32 {accuracy['fp32']:.4f} ({report['int8_accuracy_delta'] * 100:+.2f} points)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.quantize", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model.onnx (FP32)")
    parser.add_argument("--data", type=Path, required=True, help="folder of the IDX files (calibration, accuracy)")
    parser.add_argument("--run-id", type=Path, required=True, help="file holding the MLflow run id")
    parser.add_argument("--out", type=Path, required=True, help="out: the INT8 model")
    parser.add_argument("--metrics", type=Path, required=True, help="out: INT8 vs FP32 accuracy (JSON)")
    _cli.run(main, parser)
