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
