"""The KServe v2 request parser: good requests in every form, every bad one a RequestError."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.protocol import ModelSpec, RequestError, TensorSpec, infer_response, parse_infer

SPEC = ModelSpec("mnist", "abc", "onnxruntime_onnx", TensorSpec("image", "FP32", (-1, 1, 28, 28)),
                 TensorSpec("logits", "FP32", (-1, 10)))


def body(shape=(2, 1, 28, 28), data=None, datatype="FP32", name="image", **extra) -> bytes:
    if data is None:
        data = (np.arange(math.prod(shape)) % 256 / 255).tolist()
    return json.dumps({"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}],
                       **extra}).encode()


def test_flat_and_nested_data_give_the_same_batch():
    flat = parse_infer(body(id="r1"), SPEC, max_batch=8)
    nested_data = (np.arange(2 * 784) % 256 / 255).reshape(2, 1, 28, 28).tolist()
    nested = parse_infer(body(data=nested_data), SPEC, max_batch=8)
    assert flat.x.shape == (2, 1, 28, 28) and flat.x.dtype == np.float32 and flat.id == "r1"
    np.testing.assert_array_equal(flat.x, nested.x)
    assert flat.x[0, 0, 0, 5] == np.float32(5 / 255) and not flat.binary_output


def binary_request(x: np.ndarray, size: int | None = None, **request) -> tuple[bytes, int]:
    """The binary tensor data extension: JSON header, then the raw little-endian bytes."""
    raw = x.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw) if size is None else size}}],
                         **request}).encode()
    return header + raw, len(header)


def test_binary_input_gives_the_same_batch_as_json():
    x = (np.arange(3 * 784) % 256 / 255).astype(np.float32).reshape(3, 1, 28, 28)
    blob, header_length = binary_request(x, parameters={"binary_data_output": True})
    request = parse_infer(blob, SPEC, max_batch=8, header_length=header_length)
    np.testing.assert_array_equal(request.x, x)
    assert request.binary_output
    assert parse_infer(body(shape=(1, 1, 28, 28), outputs=[{"name": "logits", "parameters": {"binary_data": True}}]),
                       SPEC, 8).binary_output


def test_response_in_json_and_in_binary():
    logits = np.arange(20, dtype=np.float32).reshape(2, 10)
    text, none = infer_response(SPEC, logits, parse_infer(body(id="r1"), SPEC, 8))
    r = json.loads(text)
    assert none is None and r["model_version"] == "abc" and r["id"] == "r1"
    assert r["outputs"][0]["shape"] == [2, 10] and r["outputs"][0]["data"] == logits.ravel().tolist()
    blob, header_length = binary_request(np.zeros((2, 1, 28, 28)), parameters={"binary_data_output": True})
    raw, n = infer_response(SPEC, logits, parse_infer(blob, SPEC, 8, header_length))
    header = json.loads(raw[:n])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 80 and "data" not in header["outputs"][0]
    np.testing.assert_array_equal(np.frombuffer(raw[n:], "<f4").reshape(2, 10), logits)


ONE = np.zeros((1, 1, 28, 28), np.float32)
BAD_BINARY = {
    "header length beyond the body": (binary_request(ONE)[0], 10_000),
    "header length zero": (binary_request(ONE)[0], 0),
    "bytes fewer than the shape needs": (binary_request(ONE)[0][:-4], binary_request(ONE)[1]),
    "binary_data_size wrong": binary_request(ONE, size=100),
    "binary_data_size not an integer": binary_request(ONE, size="3136"),
    "binary NaN": (binary_request(ONE)[0][:-4] + np.float32("nan").tobytes(), binary_request(ONE)[1]),
    "header not JSON": (b"{{{{" + binary_request(ONE)[0], 4),
    "binary 1e30": (binary_request(ONE)[0][:-4] + np.float32(1e30).tobytes(), binary_request(ONE)[1]),
}


def test_pixels_are_held_to_the_contracts_range_and_its_ends_are_in_it():
    """1e30 gave logits of 1e29 before; the range is the model's contract, [0, 1]."""
    edges = parse_infer(body(shape=(1, 1, 28, 28), data=[0, 1] * 392), SPEC, 8).x
    assert edges.min() == 0 and edges.max() == 1
    with pytest.raises(RequestError, match=r"'data' holds 1e\+30 at index 783; pixels are numbers in \[0, 1\]"):
        parse_infer(body(shape=(1, 1, 28, 28), data=[0] * 783 + [1e30]), SPEC, 8)


@pytest.mark.parametrize("case", BAD_BINARY, ids=list(BAD_BINARY))
def test_each_malformed_binary_request_is_a_request_error(case):
    blob, header_length = BAD_BINARY[case]
    with pytest.raises(RequestError) as e:
        parse_infer(blob, SPEC, max_batch=8, header_length=header_length)
    assert e.value.status == 400 and str(e.value)


BAD = {
    "empty body": (b"", 400),
    "invalid JSON": (b'{"inputs": [', 400),
    "not UTF-8": (b"\xff\xfe\x00{", 400),
    "not an object": (b"[1, 2]", 400),
    "no inputs": (b'{"id": "x"}', 400),
    "two inputs": (json.dumps({"inputs": [{}, {}]}).encode(), 400),
    "id not a string": (body(id=5), 400),
    "unknown input name": (body(name="pixels"), 400),
    "wrong datatype": (body(datatype="INT32"), 400),
    "FP64 datatype": (body(datatype="FP64"), 400),
    "unknown output": (body(outputs=[{"name": "probabilities"}]), 400),
    "shape not a list": (json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": "1x784",
                                                 "data": [0] * 784}]}).encode(), 400),
    "float in shape": (body(shape=(1.0, 1, 28, 28), data=[0] * 784), 400),
    "wrong rank": (body(shape=(1, 28, 28)), 400),
    "wrong dims": (body(shape=(1, 1, 28, 27)), 400),
    "zero batch": (body(shape=(0, 1, 28, 28), data=[]), 400),
    "data length differs from shape": (body(shape=(2, 1, 28, 28), data=[0.5] * 784), 400),
    "ragged nested data": (body(shape=(1, 1, 28, 28), data=[[0.5] * 28] * 27 + [[0.5] * 27]), 400),
    "string in data": (body(shape=(1, 1, 28, 28), data=["0.5"] + [0] * 783), 400),
    "bool in data": (body(shape=(1, 1, 28, 28), data=[True] + [0] * 783), 400),
    "null in data": (body(shape=(1, 1, 28, 28), data=[None] + [0] * 783), 400),
    "data not a list": (body(shape=(1, 1, 28, 28), data="AAAA"), 400),
    "NaN": (body(shape=(1, 1, 28, 28), data=[float("nan")] + [0] * 783), 400),
    "infinity": (body(shape=(1, 1, 28, 28), data=[float("-inf")] + [0] * 783), 400),
    "too large for FP32": (body(shape=(1, 1, 28, 28), data=[1e39] + [0] * 783), 400),
    "a pixel of 1e30": (body(shape=(1, 1, 28, 28), data=[0] * 783 + [1e30]), 400),
    "a pixel of 1.8e19": (body(shape=(1, 1, 28, 28), data=[1.8e19] + [0] * 783), 400),
    "a pixel below 0": (body(shape=(1, 1, 28, 28), data=[-0.01] + [0] * 783), 400),
    "integer too large for a float": (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28],'
                                      b' "data": [' + b"9" * 400 + b"," + b"0," * 782 + b"0]}]}", 400),
    "batch over the limit": (body(shape=(9, 1, 28, 28)), 413),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_each_malformed_request_is_a_request_error_with_its_status(case):
    blob, status = BAD[case]
    with pytest.raises(RequestError) as e:
        parse_infer(blob, SPEC, max_batch=8)
    assert e.value.status == status
    assert str(e.value)  # says what is wrong


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                    max_size=4), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    json_values,
    st.fixed_dictionaries({"inputs": st.lists(st.fixed_dictionaries(
        {"name": st.sampled_from(["image", "x"]), "datatype": st.sampled_from(["FP32", "INT8", 1]),
         "shape": st.one_of(st.lists(st.integers(-2, 30), max_size=5), json_values),
         "data": st.one_of(st.lists(st.floats(), max_size=10), json_values)}), max_size=2)})))
def test_any_json_is_either_accepted_or_a_request_error(request_json):
    try:
        x = parse_infer(json.dumps(request_json).encode(), SPEC, max_batch=8).x
    except RequestError as e:
        assert 400 <= e.status < 500
    else:
        assert x.shape[1:] == (1, 28, 28) and ((0 <= x) & (x <= 1)).all()
