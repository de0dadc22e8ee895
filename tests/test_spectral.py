"""The frequency-domain convolution equals the ordinary one, values and gradients, and is used
exactly where its arithmetic is cheaper."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import spectral
from pipeline.model import ModelConfig, Net


def _pair_of_convs(c_in, c_out, k, p, seed=0):
    torch.manual_seed(seed)
    ref = nn.Conv2d(c_in, c_out, k, 1, p)
    fast = spectral.SpectralConv2d(c_in, c_out, k, 1, p)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("c_in,c_out,k,p,hw", [
    (32, 64, 5, 2, (14, 14)),  # conv2 of the tutorial network
    (3, 5, 5, 0, (11, 9)),  # valid padding, odd and non-square maps
    (4, 6, 3, 1, (8, 7)),
    (2, 3, 5, 4, (6, 6)),  # padding = kernel - 1: the widest output the grid holds
    (1, 2, 1, 0, (5, 5)),
])
def test_values_and_gradients_equal_the_ordinary_convolution(c_in, c_out, k, p, hw):
    ref, fast = _pair_of_convs(c_in, c_out, k, p)
    x = torch.randn(6, c_in, *hw, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    ref, fast = ref.double(), fast.double().train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), fast(xb)
    assert yb.shape == ya.shape
    assert torch.allclose(yb, ya, atol=1e-10)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.allclose(xb.grad, xa.grad, atol=1e-10)
    assert torch.allclose(fast.weight.grad, ref.weight.grad, atol=1e-9)
    assert torch.allclose(fast.bias.grad, ref.bias.grad, atol=1e-9)


def test_float32_error_is_rounding_sized():
    ref, fast = _pair_of_convs(32, 64, 5, 2)
    x = torch.rand(16, 32, 14, 14)
    y = ref(x)
    assert (fast.train()(x) - y).abs().max() < 1e-5 * y.abs().max()


def test_evaluation_and_gpu_paths_are_the_ordinary_convolution():
    ref, fast = _pair_of_convs(32, 64, 5, 2)
    x = torch.rand(4, 32, 14, 14)
    assert torch.equal(fast.eval()(x), ref(x))  # bit for bit: the same kernel runs


def test_the_network_uses_it_where_the_arithmetic_is_cheaper():
    convs = [m for m in Net().features if isinstance(m, nn.Conv2d)]
    assert [type(m) for m in convs] == [nn.Conv2d, spectral.SpectralConv2d]  # conv1 has one input channel
    assert spectral.direct_flops(14, 32, 64, 5, 2) == 2 * 14 * 14 * 25 * 32 * 64  # 20.1 MFLOP
    assert spectral.spectral_flops(14, 32, 64, 5, 2) == 2 * (2 * 144 * 196 * 32 + 144 * 64 * 128 + 196 * 288 * 64)
    assert spectral.spectral_flops(28, 1, 32, 5, 2) > 30 * spectral.direct_flops(28, 1, 32, 5, 2)
    small = [m for m in Net(ModelConfig(kernel=3)).features if isinstance(m, nn.Conv2d)]
    assert all(type(m) is nn.Conv2d for m in small)  # 3x3: sliding the window is cheaper
    strided = [m for m in Net(ModelConfig(stride=2, pool=1, pool_stride=1)).features if isinstance(m, nn.Conv2d)]
    assert all(type(m) is nn.Conv2d for m in strided)


def test_state_dict_is_the_plain_networks():
    plain = {k: v.shape for k, v in Net().state_dict().items()}
    assert "features.5.weight" in plain and not any("transform" in k for k in plain)


def test_unsupported_settings_are_refused():
    assert not spectral.supported(5, 2, 2)
    assert not spectral.supported(5, 1, 5)  # output would not fit the DFT grid
    assert not spectral.supported(5, 1, "same")
    with pytest.raises(ValueError, match="stride 1"):
        spectral.SpectralConv2d(2, 2, 3, stride=2)


def test_training_step_of_the_network_matches_the_ordinary_one():
    torch.manual_seed(0)
    net = Net().train()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    plain = Net(spectral_convs=False).train()
    assert type(plain.features[5]) is nn.Conv2d
    plain.load_state_dict(net.state_dict())
    grads = []
    for model in (net, plain):
        torch.manual_seed(1)  # the same dropout mask
        F.cross_entropy(model(x), y).backward()
        grads.append(model.features[5].weight.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
