"""The KServe / Open Inference Protocol v2 (the one Triton speaks), for one ONNX model.

Pure functions: JSON in, arrays out, and back, including the binary tensor data extension
(raw little-endian bytes after the JSON, whose length the Inference-Header-Content-Length
header gives), which spares both sides the cost of numbers written as text. Every way a request can be wrong raises
``RequestError`` with the HTTP status to answer and a message that says what to fix;
nothing a client sends can make these functions fail any other way.
Spec: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from pipeline.contract import PIXELS
from pipeline.errors import PipelineError

DATATYPES = {"FP32": np.float32}  # the model takes float32 pixels in [0, 1]; nothing else is accepted


class RequestError(PipelineError, ValueError):
    """A client's mistake: answer ``status`` (4xx) with ``str(self)``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for the batch axis


@dataclass(frozen=True)
class ModelSpec:
    """What the server says about its model (GET /v2/models/<name>)."""

    name: str
    version: str
    platform: str
    input: TensorSpec
    output: TensorSpec
    parameters: dict[str, str] = field(default_factory=dict)  # provenance, contract, sha256, registry version

    def metadata(self) -> dict:
        tensor = lambda t: {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}  # noqa: E731
        return {"name": self.name, "versions": [self.version], "platform": self.platform,
                "inputs": [tensor(self.input)], "outputs": [tensor(self.output)], "parameters": self.parameters}


@dataclass
class InferRequest:
    x: np.ndarray  # the input batch, shaped like spec.input with a concrete batch size
    id: str | None
    binary_output: bool  # answer with the binary tensor data extension


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError(f"{where}'parameters' must be an object")
    return params


def parse_infer(body: bytes, spec: ModelSpec, max_batch: int, header_length: int | None = None) -> InferRequest:
    """A v2 infer request -> the input batch, the request id, and the answer's form.

    ``header_length`` is the Inference-Header-Content-Length header of the binary tensor data
    extension: the first ``header_length`` bytes are the JSON, the rest the raw tensor bytes.
    """
    if not body:
        raise RequestError("empty body: send a JSON inference request")
    binary = b""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise RequestError(f"Inference-Header-Content-Length {header_length} does not fit a body of "
                               f"{len(body)} bytes")
        body, binary = body[:header_length], body[header_length:]
    try:  # orjson: fast, and it refuses nesting over 1024 deep and numbers beyond a double itself
        request = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise RequestError(f"body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError("the request must be a JSON object with an 'inputs' list")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError("'id' must be a string")
    binary_output = _parameters(request, "").get("binary_data_output", False) is True
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(f"'inputs' must be a list of exactly one tensor, named {spec.input.name!r}")
    tensor = inputs[0]
    if tensor.get("name") != spec.input.name:
        raise RequestError(f"unknown input {tensor.get('name')!r}; this model's input is {spec.input.name!r}")
    if tensor.get("datatype") != spec.input.datatype:
        raise RequestError(f"datatype {tensor.get('datatype')!r} is not accepted; send {spec.input.datatype!r}")
    outputs = request.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or any(not isinstance(o, dict) for o in outputs):
            raise RequestError("'outputs' must be a list of objects with a 'name'")
        unknown = [o.get("name") for o in outputs if o.get("name") != spec.output.name]
        if unknown:
            raise RequestError(f"unknown output(s) {unknown}; this model's output is {spec.output.name!r}")
        binary_output |= any(_parameters(o, "an output's ").get("binary_data", False) is True for o in outputs)

    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not all(type(d) is int for d in shape)):
        raise RequestError("'shape' must be a list of integers")
    want = spec.input.shape
    if len(shape) != len(want):
        raise RequestError(f"shape {shape} has rank {len(shape)}; the model takes rank {len(want)}: {list(want)}")
    if any(w != -1 and d != w for d, w in zip(shape, want)) or shape[0] < 1:
        raise RequestError(f"shape {shape} does not fit the model's {list(want)} (-1 = any batch size >= 1)")
    if shape[0] > max_batch:
        raise RequestError(f"batch of {shape[0]} is over this server's limit of {max_batch}; split the request",
                           status=413)
    expected = math.prod(shape)
    dtype = DATATYPES[spec.input.datatype]

    size = _parameters(tensor, "the input's ").get("binary_data_size")
    if size is not None or binary:
        array = _binary_tensor(binary, size, expected, dtype, "data" in tensor)
    else:
        array = _json_tensor(tensor.get("data"), expected, shape, dtype)
    _check_pixels(array, spec.input.datatype)
    return InferRequest(array.reshape(shape), request_id, binary_output)


def _check_pixels(array: np.ndarray, datatype: str) -> None:
    """Every value within the contract's range. Refused, not clamped: 1e30 is no pixel, and the
    model would answer it with logits of 1e29 as if it meant something."""
    low, high = PIXELS
    outside = ~((array >= low) & (array <= high))  # NaN is neither: outside too
    if outside.any():
        i = int(np.argmax(outside))
        value = float(array.flat[i])
        what = "NaN" if np.isnan(value) else f"{value:g}" if np.isfinite(value) else \
            f"infinity (or a number too large for {datatype})"
        raise RequestError(f"'data' holds {what} at index {i}; pixels are numbers in [{low:g}, {high:g}] "
                           f"({outside.sum():,} of {array.size:,} values are outside)")


def _binary_tensor(binary: bytes, size, expected: int, dtype, also_json: bool) -> np.ndarray:
    if also_json:
        raise RequestError("the input has both 'data' and binary data; send one")
    if type(size) is not int:
        raise RequestError("binary input data needs the input's parameters.binary_data_size (an integer) and "
                           "the Inference-Header-Content-Length header")
    want = expected * np.dtype(dtype).itemsize
    if size != want or len(binary) != size:
        raise RequestError(f"binary data is {len(binary)} bytes (binary_data_size {size}); the shape needs {want}")
    return np.frombuffer(binary, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)


def _json_tensor(values, expected: int, shape: list[int], dtype) -> np.ndarray:
    if not isinstance(values, list):
        raise RequestError("'data' must be a list of numbers (flat, or nested like the shape)")
    flat = _flatten(values)
    if len(flat) != expected:
        raise RequestError(f"'data' holds {len(flat)} values but shape {shape} needs {expected}")
    try:
        array = np.array(flat, dtype=np.float64)  # float64 first: a float32 overflow to inf is caught later
    except OverflowError:  # an integer too large for any float
        raise RequestError("'data' holds a number too large for a pixel") from None
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused by the caller
        return array.astype(dtype)


def _flatten(values: list) -> list:
    """Nested lists -> one flat list; anything but lists and numbers is refused."""
    if all(type(v) is float or type(v) is int for v in values):  # the usual flat list: the fast path
        return values
    flat: list = []
    stack = [iter(values)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            if type(v) not in (int, float):  # bool, str, None, dict: not a pixel
                raise RequestError(f"'data' must hold only numbers, found {type(v).__name__} {v!r:.40}")
            flat.append(v)
        else:
            stack.pop()
    return flat


def infer_response(spec: ModelSpec, logits: np.ndarray, request: InferRequest) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when the binary extension is used."""
    output: dict[str, Any] = {"name": spec.output.name, "datatype": spec.output.datatype,
                              "shape": list(logits.shape)}
    response: dict[str, Any] = {"model_name": spec.name, "model_version": spec.version, "outputs": [output]}
    if request.id is not None:
        response["id"] = request.id
    if not request.binary_output:
        output["data"] = np.ascontiguousarray(logits.ravel(), dtype=np.float32)  # written as float32's shortest form
        return orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY), None
    raw = np.ascontiguousarray(logits, dtype="<f4").tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    header = orjson.dumps(response)
    return header + raw, len(header)
