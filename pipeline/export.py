"""Export to ONNX, checked where it is exported (timm's habit): checker, then parity.

The model is exported with the torch.export-based exporter (``dynamo=True``) from a batch
of several images, with the batch axis declared dynamic, so the graph's batch dimension
stays symbolic. Weights are embedded: one self-contained ``model.onnx``.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from pipeline import atomic, contract, runtime
from pipeline.errors import PipelineError
from pipeline.model import Net
from pipeline.params import require


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18
    example_batch: int = 4  # traced batch size; > 1 so the exporter cannot specialise it to 1
    parity_images: int = 1000  # real test images compared between PyTorch and onnxruntime
    # Largest |logit difference| allowed. FP32 kernels that sum 800 to 3,136 products in a
    # different order differ by ~1e-6 relative; logits are at most ~50 in size, so honest
    # differences stay below ~1e-4. 1e-3 leaves room for other CPUs and providers, and is
    # still 1000x below what a real export error (a wrong pad, a lost ReLU) produces.
    parity_atol: float = 1e-3

    def __post_init__(self) -> None:
        require(17 <= self.opset <= 23, "export.opset", self.opset, "an ONNX opset from 17 to 23")
        require(self.example_batch >= 2, "export.example_batch", self.example_batch,
                "a whole number >= 2 (a batch of 1 would be baked into the graph)")
        require(self.parity_images >= 1, "export.parity_images", self.parity_images, "a whole number >= 1")
        require(self.parity_atol > 0, "export.parity_atol", self.parity_atol, "a tolerance > 0")


class ParityError(PipelineError, RuntimeError):
    """onnxruntime and PyTorch disagree on the same input beyond the tolerance."""


def export_onnx(model: nn.Module, path: str | os.PathLike, cfg: ExportConfig,
                metadata: Mapping[str, str] | None = None, producer_version: str = "") -> onnx.ModelProto:
    """Export ``model`` (eval mode, on CPU) to one self-contained, checked ONNX file, stamped
    with ``metadata`` (see ``stamp``). Our Net is written in the tutorial's conv -> ReLU ->
    pool order, which onnxruntime fuses (see Net). Measured at batch 256: the INT8 model
    67 -> 42 ms, FP32 unchanged."""
    model = model.cpu().eval()
    if isinstance(model, Net):
        model = model.in_tutorial_order().eval()
    example = torch.rand(cfg.example_batch, 1, contract.SIDE, contract.SIDE)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        model, (example,), input_names=[contract.INPUT_NAME], output_names=[contract.OUTPUT_NAME],
        opset_version=cfg.opset, dynamo=True, external_data=False,
        dynamic_shapes={"x": {0: batch}}, optimize=True, verbose=False,
    )
    if program is None:  # only with dynamo=False
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    drop_stack_traces(proto)
    side = contract.SIDE
    proto.doc_string = f"MNIST CNN (TensorFlow tutorial). Input: float32 [N,1,{side},{side}] in [0,1], white on black."
    stamp(proto, {**contract.INPUT_CONTRACT, **(metadata or {})}, producer_version)
    onnx.checker.check_model(proto, full_check=True)
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim.dim_param:
        raise RuntimeError(f"exported batch axis is fixed to {dim.dim_value}; expected a symbolic one")
    buf = io.BytesIO()
    onnx.save_model(proto, buf)  # one file, every initializer embedded (3.3 M params, ~13 MB)
    atomic.write_bytes(path, buf.getvalue())
    return proto


def stamp(proto: onnx.ModelProto, metadata: Mapping[str, str], producer_version: str) -> None:
    """Say in the file what it is and where it came from: producer_name is this project, and
    ``metadata`` becomes metadata_props, sorted by key (the same inputs give the same bytes)."""
    proto.producer_name, proto.producer_version = contract.PRODUCER, producer_version
    del proto.metadata_props[:]
    for key in sorted(metadata):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(metadata[key])


STACK_TRACE = "pkg.torch.onnx.stack_trace"  # per node: the Python frames that made it, with absolute paths


def drop_stack_traces(proto: onnx.ModelProto) -> None:
    """Remove the exporter's per-node Python stack traces. They hold the absolute paths of the
    checkout and the virtualenv, so the same weights exported from two folders gave two
    different files (and dvc.lock hashes), and leaked local paths into every deployed copy.
    The other node metadata (module names, scopes) says where a node came from, path-free."""
    graphs = [proto.graph, *(f for f in proto.functions)]
    for g in graphs:
        for node in g.node:
            keep = [p for p in node.metadata_props if p.key != STACK_TRACE]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


def parity(model: nn.Module, session: runtime.Session, images: np.ndarray, atol: float) -> dict[str, float]:
    """Compare onnxruntime with PyTorch on ``images`` (float32 N,1,28,28); raise ParityError if off."""
    model = model.cpu().eval()
    with torch.inference_mode():
        ref = model(torch.from_numpy(images)).numpy()
    got = session.run(images)
    diff = np.abs(ref - got)
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    disagree = ref.argmax(1) != got.argmax(1)
    # A flip is only excusable when PyTorch itself was within the tolerance of a tie.
    real_flips = int((disagree & (margin > 2 * atol)).sum())
    report = {
        "parity_max_abs_diff": float(diff.max()),
        "parity_mean_abs_diff": float(diff.mean()),
        "parity_argmax_agreement": float(1.0 - disagree.mean()),
        "parity_images": int(len(images)),
        "parity_atol": atol,
    }
    if report["parity_max_abs_diff"] > atol or real_flips:
        raise ParityError(
            f"onnxruntime ({session.label}) and PyTorch disagree on {len(images)} test images: "
            f"max |logit difference| {report['parity_max_abs_diff']:.3g} (allowed {atol:g}), "
            f"{int(disagree.sum())} different predictions. The exported graph does not compute "
            "the trained network; do not deploy it."
        )
    return report
