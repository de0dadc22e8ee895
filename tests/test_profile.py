"""The profiler behind the README's speed limits: FLOP counts and per-layer attribution."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks import profile
from pipeline import export
from pipeline.model import ModelConfig, Net

SMALL = ModelConfig(channels=(8, 16), fc_units=64)


def test_flops_are_the_issues_numbers():
    fwd = profile.forward_flops(ModelConfig())
    assert fwd == {"conv1": 2 * 800 * 28 * 28, "conv2": 2 * 51_200 * 14 * 14, "fc1": 2 * 3136 * 1024,
                   "logits": 2 * 1024 * 10}
    assert sum(fwd.values()) / 1e6 == pytest.approx(27.8, abs=0.05)  # "about 27.8 MFLOP per image"
    step = profile.train_flops(ModelConfig())
    assert step["conv1 backward"] == fwd["conv1"]  # the image needs no gradient
    assert step["conv2 backward"] == 2 * fwd["conv2"]
    assert sum(step.values()) / 1e6 == pytest.approx(82.0, abs=0.1)  # "about 83 MFLOP per image"


def _profiled_steps(net: Net, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters())
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return profile.torch_profile(step, net, runs=2)


@pytest.mark.integration
def test_a_training_step_is_attributed_to_its_layers():
    rows = _profiled_steps(Net(SMALL), batch=16)
    for layer in ("conv1", "conv2", "fc1", "logits"):
        assert rows[f"{layer} forward"] > 0 and rows[f"{layer} backward"] > 0, rows
    assert rows["optimizer (Adam)"] > 0 and rows["max pool backward"] > 0
    assert rows.get("other", 0) < 0.5 * sum(rows.values())  # the layers, not "other", hold the time


@pytest.mark.integration
@pytest.mark.parametrize("graph_opt", ["basic", "all"])
def test_onnxruntime_nodes_are_named_by_layer(tmp_path, graph_opt):
    """Whatever the optimiser makes of the graph (plain Conv + Relu at 'basic'; fused, NCHWc
    nodes with new names at 'all', which differ between AVX2 and AVX-512 machines)."""
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    export.export_onnx(Net(SMALL).eval(), path, export.ExportConfig())
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    rows = profile.ort_profile(path, SMALL, x, runs=3, graph_opt=graph_opt)
    named = {k.split(" ")[0] for k in rows if "(" in k}
    assert named == {"conv1", "conv2", "fc1", "logits"}, rows
    assert not {"Conv", "FusedConv", "Gemm", "FusedGemm"} & set(rows), rows  # no weighted op left unnamed
    lines = profile.table(rows, profile.forward_flops(SMALL), 8, "op")
    conv2 = next(line for line in lines if line.startswith("| conv2"))
    assert conv2.split("|")[4].strip().isdigit()  # a GFLOP/s figure for a layer whose FLOPs are known


def test_layers_are_found_by_order_not_by_node_name():
    """The graph an AVX-512 machine ran: conv1 became an NCHWc 'Conv' named after nothing we
    exported, with a ReorderOutput after it; matching by name or output size lost it."""
    from onnx import helper
    nodes = [helper.make_node("Conv", ["image", "w1"], ["a"], name="Conv", domain="com.microsoft.nchwc"),
             helper.make_node("ReorderOutput", ["a"], ["b"], name="ReorderOutput", domain="com.microsoft.nchwc"),
             helper.make_node("MaxPool", ["b"], ["c"], name="pool"),
             helper.make_node("FusedConv", ["c", "w2"], ["d"], name="relu_1_fused", domain="com.microsoft"),
             helper.make_node("QGemm", ["d", "w3"], ["e"], name="q", domain="com.microsoft"),
             helper.make_node("MatMul", ["e", "w4"], ["f"], name="mm")]
    graph = helper.make_graph(nodes, "g", [], [])
    names = profile.ort_layer_names(helper.make_model(graph), SMALL)
    assert names == {"Conv": "conv1", "relu_1_fused": "conv2", "q": "fc1", "mm": "logits"}


@pytest.mark.integration
def test_the_frequency_domain_conv2_is_attributed_to_conv2():
    net = Net()  # default widths: conv2 trains through pipeline.spectral
    assert type(net.features[5]).__name__ == "SpectralConv2d"
    rows = _profiled_steps(net, batch=8)
    assert rows["conv2 forward"] > 0 and rows["conv2 backward"] > 0, rows
    assert rows.get("other", 0) < 0.1 * rows["conv2 backward"], rows  # its gradient ops are found
