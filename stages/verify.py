"""Stage verify: every layer's shape and parameter count in model.onnx against the arithmetic."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx

from pipeline import atomic, contract, data, figures, runtime, verify
from pipeline.model import ModelConfig
from stages import _cli
from tracking.run import Tracker

BATCH = 5  # real test digits run through the graph; also the rows of the feature-map picture


def main(args: argparse.Namespace) -> None:
    model_cfg = _cli.section(ModelConfig, "model")
    plan = model_cfg.layers()
    proto = runtime.load_self_contained(args.model)  # onnx.checker runs inside verify, as one of its rows
    images, _ = data.load_split(args.data, "test")
    x = contract.to_input(images[:BATCH])

    rows = verify.verify(proto, plan, x)
    result = verify.report(rows)
    atomic.write_json(args.metrics, result)
    atomic.write_text(args.report, f"# Layer shapes of {args.model.name}\n\nPredicted by `(W - F + 2P)/S + 1` "
                      "from params.yaml, inferred by `onnx.shape_inference`, and produced by onnxruntime "
                      f"for a batch of {BATCH} real test digits (N is the symbolic batch axis).\n\n"
                      + verify.markdown(rows))
    tracker = Tracker.resume(args.run_id)
    tracker.log_metrics({"verify_ok": result["verify_ok"]}, model="fp32")  # a property of the exported model
    for path in (args.report, args.metrics):
        tracker.log_artifact(path, "verify")
    print(verify.markdown(rows))
    verify.check(rows, str(args.model))  # after the report is written: a failure leaves the diff to read
    _pictures(proto, plan, x, images[:BATCH], args)
    for path in (args.filters, args.feature_maps):
        tracker.log_artifact(path, "verify")
    tracker.finish()
    print(f"verify: all {len(rows)} layers match the arithmetic; {result['params_onnx']:,} parameters")


def _pictures(proto: onnx.ModelProto, plan, x: np.ndarray, images: np.ndarray, args) -> None:
    nodes = verify.layer_nodes(proto, plan)
    convs = [layer.name for layer in plan if layer.op == "Conv" and layer.name in nodes][:2]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    figures.conv_filters(weights[nodes["conv1"].input[1]], args.filters)
    outs = verify.run_intermediates(proto, [nodes[c].output[0] for c in convs], x)
    maps = {f"ReLU({c})": np.maximum(outs[nodes[c].output[0]], 0) for c in convs}
    figures.feature_maps(images, maps, args.feature_maps)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="stages.verify", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model.onnx")
    parser.add_argument("--data", type=Path, required=True, help="folder of the IDX files")
    parser.add_argument("--run-id", type=Path, required=True, help="file holding the MLflow run id")
    parser.add_argument("--metrics", type=Path, required=True, help="out: the shape report (JSON, every layer)")
    parser.add_argument("--report", type=Path, required=True, help="out: shape table (Markdown)")
    parser.add_argument("--filters", type=Path, required=True, help="out: conv1 filters picture")
    parser.add_argument("--feature-maps", type=Path, required=True, help="out: feature maps picture")
    _cli.run(main, parser)
