"""onnxruntime sessions: checked models, explicit providers, honest labels.

A model is loaded only after ``onnx.checker`` passes, and only if it keeps all its weights
inside itself (our exports are self-contained; an external-data reference is refused).
Providers are asked for explicitly, and what a result is labelled with comes from
``session.get_providers()``: what ran, not what was asked for or what is installed.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pipeline.errors import PipelineError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class ModelFileError(PipelineError, ValueError):
    """An ONNX file that is missing, truncated, invalid or not self-contained."""


def load_self_contained(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file and refuse it if any tensor keeps its data in another file.

    Every tensor is looked at: initializers, sparse initializers, node attributes
    (a Constant's value, ...) and the same inside sub-graphs (If, Loop, Scan bodies).
    onnx.checker is not run here; ``load_checked`` runs it.
    """
    path = Path(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing: run the export stage first (dvc repro export)") from None
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: a truncated or foreign file
        raise ModelFileError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from None
    for where, tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location", "?")
            raise ModelFileError(
                f"{path}: {where} keeps its data in an external file {location!r}; "
                "this pipeline only loads self-contained models"
            )
    return model


def _tensors(graph: onnx.GraphProto, scope: str = "") -> Iterator[tuple[str, onnx.TensorProto]]:
    """(where, tensor) for every tensor stored in ``graph`` and its sub-graphs."""
    for t in graph.initializer:
        yield f"{scope}initializer {t.name!r}", t
    for s in graph.sparse_initializer:
        yield f"{scope}sparse initializer {s.values.name!r}", s.values
        yield f"{scope}sparse initializer {s.values.name!r} (indices)", s.indices
    for node in graph.node:
        for attr in node.attribute:
            where = f"{scope}attribute {attr.name!r} of node {node.name or node.op_type!r}"
            if attr.HasField("t"):
                yield where, attr.t
            if attr.HasField("sparse_tensor"):
                yield where, attr.sparse_tensor.values
                yield where, attr.sparse_tensor.indices
            for t in attr.tensors:
                yield where, t
            subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for sub in subgraphs:
                yield from _tensors(sub, f"{scope}sub-graph of node {node.name or node.op_type!r}: ")


def check(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """onnx.checker in full (with shape inference), as a ModelFileError naming ``path``."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelFileError(f"{path} fails onnx.checker: {e}") from None


def load_checked(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse and fully check an ONNX file that must hold all of its weights itself."""
    model = load_self_contained(path)
    check(model, path)
    return model


@dataclass
class Session:
    """An inference session and the providers it really runs on."""

    session: ort.InferenceSession
    providers: list[str]  # session.get_providers(), in priority order
    requested: str  # 'cpu', 'cuda' or 'tensorrt'
    note: str  # empty, or why the requested provider is not the one running

    @property
    def label(self) -> str:
        """'cuda' only if CUDA really runs this session; else what does."""
        inv = {v: k for k, v in PROVIDERS.items()}
        return inv.get(self.providers[0], self.providers[0])

    def run(self, x: np.ndarray) -> np.ndarray:
        name = self.session.get_inputs()[0].name
        return self.session.run(None, {name: x})[0]


def sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256 (hex): its identity from the registry (a version tag) to the service."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """What the file says about itself: its metadata_props (provenance and input contract)."""
    return {p.key: p.value for p in model.metadata_props}


def session_options(threads: int = 0, graph_opt: str = "all", config: dict[str, str] | None = None
                    ) -> ort.SessionOptions:
    """Options for one session; ``config``: onnxruntime session config entries (key: value)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_opt]
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1  # one sequential graph: a second pool only competes for cores
    so.log_severity_level = 3  # errors only; a missing CUDA is reported by us, in plain words
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    return so


def open_session(model: onnx.ModelProto | bytes, provider: str = "cpu", threads: int = 0,
                 graph_opt: str = "all", provider_options: dict | None = None,
                 config: dict[str, str] | None = None) -> Session:
    """A session on ``provider`` with CPU as fallback; ``note`` says if the fallback happened."""
    wanted = PROVIDERS[provider]
    chain = [wanted] if provider == "cpu" else [wanted, "CPUExecutionProvider"]
    if provider == "tensorrt":
        chain.insert(1, "CUDAExecutionProvider")
    options = [provider_options or {} if p == wanted else {} for p in chain]
    blob = model if isinstance(model, bytes) else model.SerializeToString()
    note = ""
    if wanted not in ort.get_available_providers():
        note = f"{wanted} is not in this onnxruntime build ({ort.__version__}); running on CPU"
        chain, options = ["CPUExecutionProvider"], [{}]
    sess = ort.InferenceSession(blob, session_options(threads, graph_opt, config), providers=chain,
                                provider_options=options)
    used = sess.get_providers()
    if used[0] != wanted and not note:
        note = f"{wanted} could not start (no usable GPU or CUDA libraries); running on {used[0]}"
    return Session(sess, used, provider, note)
