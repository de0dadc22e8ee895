"""The verify stage's comparison, and property tests of the arithmetic against real runtimes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from pipeline import contract, export, runtime, shapes, verify
from pipeline.model import ModelConfig, Net


def exported(tmp_path, cfg: ModelConfig) -> onnx.ModelProto:
    torch.manual_seed(0)
    path = tmp_path / "model.onnx"
    export.export_onnx(Net(cfg).eval(), path, export.ExportConfig())
    return runtime.load_checked(path)


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("m"), ModelConfig())


@pytest.fixture(scope="module")
def x(test_split):
    return contract.to_input(test_split[0][:3])


@pytest.mark.integration
def test_default_model_matches_the_tutorial_table(default_model, x):
    rows = verify.verify(default_model, ModelConfig().layers(), x)
    verify.check(rows)
    by = {r.layer: r for r in rows}
    assert by["conv2"].predicted == by["conv2"].runtime == ["N", 64, 14, 14]
    assert by["conv2"].inferred == ["batch", 64, 14, 14]  # the symbolic batch axis by name
    assert by["flatten"].runtime == ["N", 3136] and by["logits"].inferred[1:] == [10]
    assert all(isinstance(r.inferred[0], str) for r in rows)  # symbolic batch axis all the way down
    assert sum(r.params_onnx for r in rows) == 3_274_634
    table = verify.markdown(rows)
    assert "| conv1 | Conv | N x 32 x 28 x 28 | batch x 32 x 28 x 28 | N x 32 x 28 x 28 |" in table
    assert "3,274,634 / 3,274,634 | yes |" in table


@pytest.mark.integration
def test_an_altered_conv_padding_fails_and_names_the_layer(default_model, x):
    bad = onnx.ModelProto()
    bad.CopyFrom(default_model)
    conv2 = [n for n in bad.graph.node if n.op_type == "Conv"][1]
    for a in conv2.attribute:
        if a.name == "pads":
            a.ints[:] = [0, 0, 0, 0]  # SAME -> VALID: 14x14 becomes 10x10
    with pytest.raises(verify.VerifyError) as e:
        verify.check(verify.verify(bad, ModelConfig().layers(), x))
    msg = str(e.value)
    assert "conv2 (" in msg and "ONNX-inferred batch x 64 x 10 x 10 != predicted N x 64 x 14 x 14" in msg
    assert "onnxruntime N x 64 x 10 x 10 != predicted" in msg
    assert "conv1 (" not in msg


@pytest.mark.integration
def test_a_fixed_batch_axis_fails(default_model, x):
    fixed = onnx.ModelProto()
    fixed.CopyFrom(default_model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    with pytest.raises(verify.VerifyError, match="batch axis is fixed to 3"):
        verify.check(verify.verify(fixed, ModelConfig().layers(), x))


@pytest.mark.integration
def test_a_model_of_another_architecture_fails_against_the_params(tmp_path, x):
    other = exported(tmp_path, ModelConfig(channels=(16, 32), kernel=3))
    with pytest.raises(verify.VerifyError, match="conv1 .*51,264|conv1 .*predicted N x 32 x 28 x 28"):
        verify.check(verify.verify(other, ModelConfig().layers(), x))


@pytest.mark.integration
@pytest.mark.parametrize("cfg", [ModelConfig(channels=(16, 32), kernel=3), ModelConfig(padding="valid"),
                                 ModelConfig(kernel=4, channels=(8, 8))])
def test_non_default_architectures_verify(tmp_path, x, cfg):
    rows = verify.verify(exported(tmp_path, cfg), cfg.layers(), x)
    verify.check(rows)
    assert rows[-3].runtime == ["N", cfg.layers()[-3].shape[0]]


# ------------------------------------------------------------- property tests of the formula

layer = st.tuples(
    st.integers(1, 40),  # W
    st.integers(1, 9),  # F
    st.integers(1, 4),  # S
    st.one_of(st.integers(0, 4), st.sampled_from(["same", "valid"])),  # P
)


def ort_conv_pool_shape(w, f, s, p, pool, pool_s) -> tuple[int, ...]:
    """Output shape onnxruntime gives a Conv (then MaxPool) with these settings."""
    conv_attrs = {"kernel_shape": [f, f], "strides": [s, s]}
    if p == "same":
        conv_attrs["auto_pad"] = "SAME_UPPER"  # TensorFlow's SAME: extra padding at the end
    else:
        pad = 0 if p == "valid" else p
        conv_attrs["pads"] = [pad] * 4
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], **conv_attrs)]
    out = "y"
    if pool:
        nodes.append(helper.make_node("MaxPool", ["y"], ["z"], kernel_shape=[pool, pool], strides=[pool_s, pool_s]))
        out = "z"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, w, w])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 2, f, f], np.ones(3 * 2 * f * f, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    session = runtime.open_session(model, "cpu")
    return session.run(np.zeros((1, 2, w, w), np.float32)).shape


def torch_conv_pool_shape(w, f, s, p, pool, pool_s) -> tuple[int, ...]:
    before, after = shapes.padding_pair(w, f, s, p)
    x = torch.nn.functional.pad(torch.zeros(1, 2, w, w), (before, after, before, after))
    y = torch.nn.functional.conv2d(x, torch.ones(3, 2, f, f), stride=s)
    if pool:
        y = torch.nn.functional.max_pool2d(y, pool, pool_s)
    return tuple(y.shape)


@pytest.mark.integration  # 500 onnxruntime sessions: a minute of the fast tier's budget
@settings(max_examples=500, deadline=None)
@given(layer, st.integers(0, 3), st.integers(1, 3))
def test_formula_matches_pytorch_and_onnxruntime(conv, pool, pool_s):
    w, f, s, p = conv
    try:
        out = shapes.output_size(w, f, s, p)
        pooled = shapes.output_size(out, pool, pool_s, 0) if pool else out
    except shapes.ShapeError as e:
        # Refused: the window doesn't fit or the stride doesn't tile. The message shows the
        # formula with its numbers, and the runtimes (which floor) would not agree with it.
        assert " = " in str(e) and ("does not tile" in str(e) or "larger than" in str(e))
        return
    assert torch_conv_pool_shape(w, f, s, p, pool, pool_s) == (1, 3, pooled, pooled)
    assert ort_conv_pool_shape(w, f, s, p, pool, pool_s) == (1, 3, pooled, pooled)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(1, 9), st.integers(1, 4))
def test_refused_exactly_when_the_formula_is_not_a_positive_whole_number(w, f, s):
    span = w - f
    valid = span >= 0 and span % s == 0
    if valid:
        assert shapes.output_size(w, f, s, "valid") == span // s + 1
    else:
        with pytest.raises(shapes.ShapeError):
            shapes.output_size(w, f, s, "valid")


def test_param_counts_match_pytorch():
    for f, d, k in [(5, 1, 32), (5, 32, 64), (3, 16, 8)]:
        conv = torch.nn.Conv2d(d, k, f)
        assert shapes.conv_params(f, d, k) == sum(p.numel() for p in conv.parameters())
    assert shapes.dense_params(3136, 1024) == sum(p.numel() for p in torch.nn.Linear(3136, 1024).parameters())


# ------------------------------------------------------------- broken models must not pass


@pytest.mark.integration
def test_a_model_that_onnxruntime_cannot_run_fails(default_model, x):
    """A Gather after the logits with an index out of range: every layer before it is fine,
    but the model as deployed can't run (before: 'all 7 layers match', verify_ok true)."""
    bad = onnx.ModelProto()
    bad.CopyFrom(default_model)
    logits = bad.graph.output[0].name
    bad.graph.initializer.append(onnx.numpy_helper.from_array(np.array([99], np.int64), "bad_index"))
    bad.graph.node.append(helper.make_node("Gather", [logits, "bad_index"], ["picked"], axis=1, name="pick"))
    del bad.graph.output[:]
    bad.graph.output.append(helper.make_tensor_value_info("picked", TensorProto.FLOAT, None))
    rows = verify.verify(bad, ModelConfig().layers(), x)
    assert not verify.report(rows)["verify_ok"]
    with pytest.raises(verify.VerifyError, match="model: onnxruntime cannot run the whole model: .*"):
        verify.check(rows)


@pytest.mark.integration
def test_a_tampered_file_fails_the_stage_naming_the_layer_and_the_file_with_a_report(default_model, raw_dir,
                                                                                         tmp_path):
    """Pads of conv2 changed with the exporter's value_info kept (what a plain onnx edit
    leaves): onnx.checker fails naming 'node_conv2d_1'. The stage must still write its
    report, name conv2 and the file it was given, and exit non-zero."""
    import subprocess
    import sys

    from tests.conftest import REPO
    bad = onnx.ModelProto()
    bad.CopyFrom(default_model)
    assert len(bad.graph.value_info) > 0  # the exporter's shape annotations are there
    conv2 = [n for n in bad.graph.node if n.op_type == "Conv"][1]
    for a in conv2.attribute:
        if a.name == "pads":
            a.ints[:] = [0, 0, 0, 0]
    path = tmp_path / "tampered.onnx"
    onnx.save_model(bad, path)
    out = {k: tmp_path / f"out.{k}" for k in ("json", "md", "filters.png", "maps.png")}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.verify", "--model", str(path), "--data", str(raw_dir),
         "--run-id", str(tmp_path / "no-run-id"), "--metrics", str(out["json"]), "--report", str(out["md"]),
         "--filters", str(out["filters.png"]), "--feature-maps", str(out["maps.png"])],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    error = proc.stderr.splitlines()[-1] if proc.stderr else ""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"{path} does not match the convolution arithmetic" in proc.stderr
    assert "(layer conv2)" in proc.stderr and "conv2 (" in proc.stderr, error
    report = __import__("json").loads(out["json"].read_text())
    assert report["verify_ok"] is False and report["verify_mismatches"] >= 1
    assert "# Layer shapes of tampered.onnx" in out["md"].read_text()
    assert "NO: " in out["md"].read_text()
