"""Stage export: the trained weights to one self-contained, checked model.onnx, with a parity check."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline import atomic, contract, data, export, runtime
from pipeline.contract import RegistryConfig
from pipeline.model import ModelConfig, Net
from stages import _cli
from tracking import datasets
from tracking.provenance import model_provenance, package_version
from tracking.run import Tracker


def main(args: argparse.Namespace) -> None:
    all_params = _cli.load_params()
    model_cfg = _cli.section(ModelConfig, "model", all_params)
    cfg = _cli.section(export.ExportConfig, "export", all_params)
    registry = _cli.section(RegistryConfig, "registry", all_params)
    model = Net.from_weights(model_cfg, args.weights)
    run_key = args.run_id.read_text().strip() if args.run_id.is_file() else ""
    provenance = model_provenance(args.data, run_key, json.loads(args.train_metrics.read_text())["device"],
                                  {k: all_params.get(k) for k in ("model", "train")})

    export.export_onnx(model, args.out, cfg, provenance, package_version(contract.PRODUCER))
    proto = runtime.load_checked(args.out)  # what a user gets: the file as written, re-read
    images, _ = data.load_split(args.data, "test")
    x = contract.to_input(images[:cfg.parity_images])
    session = runtime.open_session(proto, "cpu")
    report = {**export.parity(model, session, x, cfg.parity_atol),
              "opset": cfg.opset, "onnx_bytes": args.out.stat().st_size, "provider": session.label}
    atomic.write_json(args.metrics, report)

    tracker = Tracker.resume(args.run_id)
    example = x[:2]
    parity = {k: v for k, v in report.items() if k.startswith("parity_")}
    tracker.log_onnx_model(args.out, example, session.run(example), "fp32", registry.model_name,
                           {**parity, "sha256": runtime.sha256(args.out)},  # sha256: the file's identity
                           step=all_params["train"]["epochs"])  # the model of the last epoch
    test_set = datasets.mnist("test", provenance["data_md5"])  # parity is measured on its first images
    tracker.log_metrics({k: parity[k] for k in ("parity_max_abs_diff", "parity_argmax_agreement")}, model="fp32",
                        dataset=test_set)
    tracker.log_artifact(args.metrics, "export")
    tracker.finish()
    print(f"{args.out}: {report['onnx_bytes'] / 1e6:.1f} MB, opset {cfg.opset}; onnxruntime vs PyTorch "
          f"on {len(x)} test images: max |diff| {report['parity_max_abs_diff']:.2e}, "
          f"argmax agreement {report['parity_argmax_agreement']:.2%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.export", description=__doc__)
    parser.add_argument("--weights", type=Path, required=True, help="the trained state_dict (.pt)")
    parser.add_argument("--data", type=Path, required=True, help="folder of the IDX files (for parity)")
    parser.add_argument("--run-id", type=Path, required=True, help="file holding the MLflow run id")
    parser.add_argument("--train-metrics", type=Path, required=True, help="the train stage's metrics (its device)")
    parser.add_argument("--out", type=Path, required=True, help="out: model.onnx")
    parser.add_argument("--metrics", type=Path, required=True, help="out: parity report (JSON)")
    _cli.run(main, parser)
