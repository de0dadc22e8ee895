import pytest
import torch

from pipeline.model import ModelConfig, Net, count_params

# DESIGN.md's network table: output shapes (without N) and parameter counts.
TUTORIAL = {
    "conv1": ((32, 28, 28), 832),
    "pool1": ((32, 14, 14), 0),
    "conv2": ((64, 14, 14), 51_264),
    "pool2": ((64, 7, 7), 0),
    "flatten": ((3136,), 0),
    "fc1": ((1024,), 3_212_288),
    "logits": ((10,), 10_250),
}


def test_default_network_is_the_tutorials():
    net = Net()
    assert count_params(net) == 3_274_634
    plan = {layer.name: (layer.shape, layer.params) for layer in ModelConfig().layers()}
    assert plan == TUTORIAL


def test_real_shapes_match_the_plan():
    net = Net().eval()
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in net.features if isinstance(m, torch.nn.MaxPool2d)]
    seen = {}
    for name, module in [("conv1", convs[0]), ("conv2", convs[1]), ("pool1", pools[0]), ("pool2", pools[1]),
                         ("fc1", net.fc1), ("logits", net.out)]:
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape[1:])))
    with torch.no_grad():
        out = net(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert seen == {k: v[0] for k, v in TUTORIAL.items() if k != "flatten"}


@pytest.mark.parametrize("cfg", [
    ModelConfig(channels=(16, 32), kernel=3),
    ModelConfig(padding="valid"),  # 28 -> 24 -> 12 -> 8 -> 4
    ModelConfig(kernel=4),  # SAME with an even kernel pads one more after than before
    ModelConfig(channels=(8,), kernel=4, stride=2, padding=1, pool=2, pool_stride=1),
])
def test_other_architectures_build_and_agree_with_their_plan(cfg):
    net = Net(cfg).eval()
    plan = cfg.layers()
    assert count_params(net) == sum(layer.params for layer in plan)
    feats = net.features(torch.rand(2, 1, 28, 28))
    assert tuple(feats.shape[1:]) == plan[-4].shape  # the last pool


def test_both_orders_are_the_same_function_and_gradient():
    torch.manual_seed(0)
    net = Net().eval()  # eval: no dropout, so both see the same function
    other = net.in_tutorial_order()
    assert [type(m).__name__ for m in other.features][1:4] == ["Conv2d", "ReLU", "MaxPool2d"]
    assert [type(m).__name__ for m in net.features][1:4] == ["Conv2d", "MaxPool2d", "ReLU"]
    x = torch.randn(8, 1, 28, 28)  # signed input: both signs reach the ReLUs
    out_a, out_b = net(x), other(x)
    assert torch.equal(out_a, out_b)  # max and ReLU commute exactly, not just nearly
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for (name, a), b in zip(net.named_parameters(), other.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name
