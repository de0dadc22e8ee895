"""Stage quantize: the static INT8 (QDQ) model, calibrated on training digits, with its accuracy."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import atomic, contract, data, evaluate, quantize, runtime
from stages import _cli
from tracking import datasets
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
    sessions = {name: runtime.open_session(proto, "cpu") for name, proto in models.items()}
    results = {name: evaluate.accuracy_report(test_y, evaluate.predict_logits(s, test_x, 1000))
               for name, s in sessions.items()}
    report = {**results, "int8_accuracy_delta": results["int8"]["accuracy"] - results["fp32"]["accuracy"],
              "calibration_images": cfg.calibration_images, "int8_onnx_bytes": args.out.stat().st_size}
    atomic.write_json(args.metrics, report)

    tracker = Tracker.resume(args.run_id)
    example = contract.to_input(test_x[:2])
    tracker.log_onnx_model(args.out, example, sessions["int8"].run(example), name="int8",  # a model of its own,
                           step=_cli.load_params()["train"]["epochs"])  # from the last epoch
    test_set = datasets.mnist("test", runtime.metadata(models["int8"])["data_md5"])
    tracker.log_metrics(evaluate.model_metrics(results["int8"]), model="int8", dataset=test_set)
    tracker.log_artifact(args.metrics, "quantize")
    tracker.finish()
    print(f"{args.out}: {report['int8_onnx_bytes'] / 1e6:.1f} MB; test accuracy INT8 {results['int8']['accuracy']:.4f} "
          f"vs FP32 {results['fp32']['accuracy']:.4f} ({report['int8_accuracy_delta'] * 100:+.2f} points)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.quantize", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model.onnx (FP32)")
    parser.add_argument("--data", type=Path, required=True, help="folder of the IDX files (calibration, accuracy)")
    parser.add_argument("--run-id", type=Path, required=True, help="file holding the MLflow run id")
    parser.add_argument("--out", type=Path, required=True, help="out: the INT8 model")
    parser.add_argument("--metrics", type=Path, required=True, help="out: INT8 vs FP32 accuracy (JSON)")
    _cli.run(main, parser)
