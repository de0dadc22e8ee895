"""A Triton Inference Server model repository for the exported model.

    <repo>/<name>/config.pbtxt      onnxruntime backend, dynamic batching, input/output specs
    <repo>/<name>/1/model.onnx      the exported model, byte for byte

The input and output specs are read from the ONNX graph (never typed by hand), without
the batch axis, which Triton adds itself when ``max_batch_size`` > 0.
Config reference: https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/user_guide/model_configuration.html
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from pipeline import atomic
from pipeline.errors import PipelineError
from pipeline.params import require

# ONNX element types -> Triton's DataType names (model_config.proto)
TRITON_TYPES: dict[int, str] = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT64: "TYPE_INT64",
                onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.UINT8: "TYPE_UINT8",
                onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.BOOL: "TYPE_BOOL"}


@dataclass(frozen=True)
class TritonConfig:
    max_batch_size: int = 256
    preferred_batch_sizes: tuple[int, ...] = (64, 256)
    max_queue_delay_us: int = 500  # how long Triton may hold a request to fill a batch
    instance_kind: str = "KIND_AUTO"  # KIND_AUTO (GPU when there is one) | KIND_CPU | KIND_GPU
    instance_count: int = 1

    def __post_init__(self) -> None:
        require(self.max_batch_size >= 1, "triton.max_batch_size", self.max_batch_size, "a whole number >= 1")
        require(all(1 <= b <= self.max_batch_size for b in self.preferred_batch_sizes),
                "triton.preferred_batch_sizes", self.preferred_batch_sizes, "sizes in 1..max_batch_size")
        require(self.max_queue_delay_us >= 0, "triton.max_queue_delay_us", self.max_queue_delay_us, ">= 0")
        require(self.instance_kind in ("KIND_AUTO", "KIND_CPU", "KIND_GPU"), "triton.instance_kind",
                self.instance_kind, "KIND_AUTO | KIND_CPU | KIND_GPU")
        require(self.instance_count >= 1, "triton.instance_count", self.instance_count, "a whole number >= 1")


class TritonError(PipelineError, ValueError):
    """The model cannot be served by Triton as configured (for example, a fixed batch axis)."""


def _tensor(value: onnx.ValueInfoProto, what: str) -> str:
    t = value.type.tensor_type
    if t.elem_type not in TRITON_TYPES:
        raise TritonError(f"{what} {value.name!r}: element type {onnx.TensorProto.DataType.Name(t.elem_type)} "
                          "has no Triton equivalent here")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    if not dims or dims[0] != -1:
        raise TritonError(f"{what} {value.name!r} has shape {dims}: its first axis must be a symbolic batch "
                          "axis for Triton's batching (export with a dynamic batch axis)")
    if -1 in dims[1:]:
        raise TritonError(f"{what} {value.name!r} has shape {dims}: only the batch axis may be symbolic")
    return (f'  {{\n    name: "{value.name}"\n    data_type: {TRITON_TYPES[t.elem_type]}\n'
            f"    dims: [ {', '.join(map(str, dims[1:]))} ]\n  }}")


def config_pbtxt(model: onnx.ModelProto, name: str, cfg: TritonConfig) -> str:
    """The text of config.pbtxt for ``model`` served as ``name``."""
    graph = model.graph
    inputs = ",\n".join(_tensor(v, "input") for v in graph.input)
    outputs = ",\n".join(_tensor(v, "output") for v in graph.output)
    return (
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {cfg.max_batch_size}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(map(str, cfg.preferred_batch_sizes))} ]\n"
        f"  max_queue_delay_microseconds: {cfg.max_queue_delay_us}\n"
        "}\n"
        f"instance_group [\n  {{\n    kind: {cfg.instance_kind}\n    count: {cfg.instance_count}\n  }}\n]\n"
        "version_policy: { latest { num_versions: 1 } }\n"
    )


def write_repository(model_path: str | os.PathLike, repo: str | os.PathLike, name: str,
                     cfg: TritonConfig, model: onnx.ModelProto) -> Path:
    """(Re)create ``repo`` holding one model, ``name``, version 1; returns the config's path."""
    repo = Path(repo)
    text = config_pbtxt(model, name, cfg)
    staging = repo.with_name(f".{repo.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / name / "1").mkdir(parents=True)
    shutil.copyfile(model_path, staging / name / "1" / "model.onnx")
    atomic.write_text(staging / name / "config.pbtxt", text)
    shutil.rmtree(repo, ignore_errors=True)
    staging.rename(repo)  # the whole repository appears at once, or not at all
    return repo / name / "config.pbtxt"
