import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline import contract, export, runtime
from pipeline.model import ModelConfig, Net

pytestmark = pytest.mark.integration  # starts processes or servers, trains or exports


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = Net(ModelConfig()).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export.export_onnx(model, path, export.ExportConfig())
    return model, path


def test_export_is_self_contained_checked_and_batch_symbolic(exported):
    _, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no external data file
    proto = runtime.load_checked(path)
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    assert [i.name for i in proto.graph.input] == ["image"]
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") == 2 and ops.count("MaxPool") == 2
    # the tutorial's order, whose Conv + Relu onnxruntime fuses (the trained Net pools first)
    assert ops[:6] == ["Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool"], ops


def test_parity_on_real_digits(exported, test_split):
    model, path = exported
    session = runtime.open_session(runtime.load_checked(path), "cpu")
    x = contract.to_input(test_split[0][:300])
    report = export.parity(model, session, x, atol=1e-3)
    assert report["parity_argmax_agreement"] == 1.0
    assert report["parity_max_abs_diff"] < 1e-4
    for batch in (1, 7, 300):  # the batch axis really is dynamic
        assert session.run(x[:batch]).shape == (batch, 10)


def test_parity_catches_a_graph_that_differs(exported, test_split):
    model, path = exported
    session = runtime.open_session(runtime.load_checked(path), "cpu")
    other = Net(ModelConfig()).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.fc1.bias += 0.05  # what a subtly wrong export would look like
    with pytest.raises(export.ParityError, match="disagree on 100 test images"):
        export.parity(other, session, contract.to_input(test_split[0][:100]), atol=1e-3)


def test_truncated_and_foreign_files_are_refused(exported, tmp_path):
    _, path = exported
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[: 100_000])
    with pytest.raises(runtime.ModelFileError, match="not a readable ONNX model"):
        runtime.load_checked(cut)
    with pytest.raises(runtime.ModelFileError, match="missing: run the export stage first"):
        runtime.load_checked(tmp_path / "nope.onnx")


def test_external_data_is_refused(exported, tmp_path):
    _, path = exported
    proto = onnx.load(path)
    onnx.save_model(proto, tmp_path / "ext.onnx", save_as_external_data=True, location="weights.bin",
                    size_threshold=1024)
    with pytest.raises(runtime.ModelFileError, match="external file 'weights.bin'"):
        runtime.load_checked(tmp_path / "ext.onnx")


def test_cuda_request_is_labelled_honestly(exported):
    _, path = exported
    s = runtime.open_session(runtime.load_checked(path), "cuda")
    if "CUDAExecutionProvider" in s.providers:
        pytest.skip("this machine really runs CUDA")
    assert s.label == "cpu" and s.providers == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in s.note and "running on CPUExecutionProvider" in s.note


def _with_external_constant(proto: onnx.ModelProto, in_subgraph: bool) -> onnx.ModelProto:
    """``proto`` plus a Constant whose tensor points at an external file (params.yaml)."""
    from onnx import TensorProto, helper
    tensor = helper.make_tensor("ext", TensorProto.FLOAT, [1], [0.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "params.yaml"
    const = helper.make_node("Constant", [], ["c"], value=tensor, name="sneaky")
    bad = onnx.ModelProto()
    bad.CopyFrom(proto)
    if in_subgraph:
        out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])
        body = helper.make_graph([const], "then", [], [out])
        other = helper.make_graph([helper.make_node("Constant", [], ["c"], value_float=1.0)], "else", [], [out])
        bad.graph.initializer.append(onnx.numpy_helper.from_array(np.array(True), "cond"))
        bad.graph.node.append(helper.make_node("If", ["cond"], ["c_out"], then_branch=body, else_branch=other))
    else:
        bad.graph.node.insert(0, const)
    return bad


@pytest.mark.parametrize("in_subgraph", [False, True])
def test_external_data_outside_initializers_is_refused_before_onnxruntime(exported, tmp_path, in_subgraph):
    _, path = exported
    bad = _with_external_constant(onnx.load(path), in_subgraph)
    onnx.save_model(bad, tmp_path / "bad.onnx")
    for load in (runtime.load_checked, runtime.load_self_contained):
        with pytest.raises(runtime.ModelFileError, match="attribute .value. of node .sneaky. keeps its data "
                                                         "in an external file 'params.yaml'"):
            load(tmp_path / "bad.onnx")


EXPORT_SCRIPT = """
import sys, torch
from pipeline import export
from pipeline.model import ModelConfig, Net
model = Net(ModelConfig())
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
export.export_onnx(model, sys.argv[2], export.ExportConfig())
"""


def test_the_same_weights_give_the_same_bytes_wherever_the_checkout_is(exported, tmp_path):
    """The exporter kept each node's stack trace, with the checkout's and the virtualenv's
    absolute paths: two clones exported different files from one model.pt."""
    from tests.conftest import REPO, copy_repo
    model, _ = exported
    torch.save(model.state_dict(), tmp_path / "model.pt")
    clone = copy_repo(tmp_path / "elsewhere" / "clone")
    outs = []
    for where in (REPO, clone):
        out = tmp_path / f"{where.name}.onnx"
        subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(tmp_path / "model.pt"), str(out)],
                       cwd=where, check=True, capture_output=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(where)})
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    for path in (REPO, clone, Path(sys.prefix)):
        assert str(path).encode() not in outs[0], path


def test_the_file_states_its_contract_producer_and_the_metadata_given(exported, tmp_path):
    model, _ = exported
    path = tmp_path / "stamped.onnx"
    given = {"mlflow_run_id": "abc123", "git_commit": "f" * 40, "data_md5": "d0.dir"}
    export.export_onnx(model, path, export.ExportConfig(), given, "9.9.9")
    proto = runtime.load_checked(path)
    assert (proto.producer_name, proto.producer_version) == (contract.PRODUCER, "9.9.9")
    meta = runtime.metadata(proto)
    assert meta == {**contract.INPUT_CONTRACT, **given}
    assert meta["labels"] == "0,1,2,3,4,5,6,7,8,9" and meta["input_layout"] == "NCHW"
    assert [p.key for p in proto.metadata_props] == sorted(meta)  # one order: the same inputs, the same bytes
    again = tmp_path / "again.onnx"
    export.export_onnx(model, again, export.ExportConfig(), dict(reversed(list(given.items()))), "9.9.9")
    assert again.read_bytes() == path.read_bytes()
