"""The Triton model repository, checked with Triton's own protobuf definitions."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import pytest
import torch
from google.protobuf import text_format

from pipeline import runtime, triton
from pipeline.model import ModelConfig, Net


@pytest.fixture(scope="module")
def model_config_pb2():
    """tritonclient's generated model_config_pb2 (Triton's model_config.proto), loaded from its file.

    Importing it as ``tritonclient.grpc.model_config_pb2`` would run that package's __init__,
    which needs grpcio; the message definitions themselves need only protobuf.
    """
    spec = importlib.util.find_spec("tritonclient")
    assert spec is not None, "tritonclient is a test dependency: pip install -e .[test]"
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_repository_layout_and_config_parse_with_tritons_definitions(served_model, model_config_pb2, tmp_path):
    cfg = triton.TritonConfig(max_batch_size=128, preferred_batch_sizes=(32, 128), max_queue_delay_us=250)
    config_path = triton.write_repository(served_model, tmp_path / "repo", "mnist", cfg,
                                          runtime.load_checked(served_model))
    assert config_path == tmp_path / "repo" / "mnist" / "config.pbtxt"
    assert (tmp_path / "repo" / "mnist" / "1" / "model.onnx").read_bytes() == served_model.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging folder left behind

    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    assert config.name == "mnist" and config.backend == "onnxruntime" and config.max_batch_size == 128
    (inp,), (out,) = config.input, config.output
    assert (inp.name, list(inp.dims), inp.data_type) == ("image", [1, 28, 28], model_config_pb2.TYPE_FP32)
    assert (out.name, list(out.dims), out.data_type) == ("logits", [10], model_config_pb2.TYPE_FP32)
    assert list(config.dynamic_batching.preferred_batch_size) == [32, 128]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    assert config.version_policy.latest.num_versions == 1

    # The dims are the ONNX graph's, minus the batch axis that Triton adds.
    graph = onnx.load(config_path.parent / "1" / "model.onnx").graph
    onnx_dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    assert onnx_dims == list(inp.dims)


def test_the_parser_used_above_is_strict(model_config_pb2):
    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "m"\nmax_batch_sise: 8\n', model_config_pb2.ModelConfig())


@pytest.mark.integration
def test_a_model_with_a_fixed_batch_axis_is_refused(tmp_path):
    model = Net(ModelConfig(channels=(4, 8), fc_units=16)).eval()
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), path, input_names=["image"], output_names=["logits"],
                      dynamo=True, external_data=False)
    with pytest.raises(triton.TritonError, match="batch axis"):
        triton.config_pbtxt(onnx.load(path), "m", triton.TritonConfig())


@pytest.mark.parametrize("bad", [dict(max_batch_size=0), dict(preferred_batch_sizes=(512,)),
                                 dict(instance_kind="KIND_TPU"), dict(instance_count=0)])
def test_invalid_triton_params_are_refused(bad):
    from pipeline.params import ParamError
    with pytest.raises(ParamError):
        triton.TritonConfig(**bad)
