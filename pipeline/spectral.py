"""Convolution through the convolution theorem, as three matrix products (faster CPU training).

A stride-1 convolution is a product in the frequency domain: take the 2-D discrete Fourier
transform (DFT) of every input map and every filter, multiply them frequency by frequency
(the filter's conjugated: a convolution layer correlates), sum over input channels, and
transform back. On grids as small as conv2's (14x14 maps padded to 16x16), a dense DFT
*matrix* is faster than an FFT call, so each of the three steps is one matrix multiply and
autograd derives the backward pass from them:

    to spectra   X   = T_in @ x      (2F x HW)         @ (HW x C_in)       per image
    channels     Y_f = X_f @ W_f     (B x 2C_in)       @ (2C_in x 2C_out)  per frequency f
    back         y   = T_out @ Y     (H_out W_out x 2F) @ (2F x C_out)     per image

F is the number of frequencies of the real 2-D DFT; every spectrum is stored as real and
imaginary parts, so all three products are real. Placing the image at offset (p, p) on an
(H + p) x (W + p) grid makes the circular correlation wrap only onto zeros for the outputs
kept, so the result equals the zero-padded convolution up to float rounding.

For conv2 of the tutorial network this is 13.2 instead of 20.1 MFLOP per image forward, and
about 15.5 instead of 40.1 for the two gradients; conv1 (one input channel, 28x28) would
cost 40x more, so ``conv2d`` builds a SpectralConv2d only where the arithmetic says it is
cheaper. Only CPU training uses it: evaluation and ONNX export run the ordinary
convolution (same weights, same state_dict), and on a GPU cuDNN picks its own algorithms.
"""
from __future__ import annotations

import torch
from torch import nn


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def grid(hw: tuple[int, int], padding: tuple[int, int]) -> tuple[int, int]:
    """The DFT grid: the image plus its leading padding; the trailing padding wraps onto it."""
    return hw[0] + padding[0], hw[1] + padding[1]


def frequencies(n: tuple[int, int]) -> int:
    """Frequencies of the real 2-D DFT on an n[0] x n[1] grid (the rest are complex conjugates)."""
    return n[0] * (n[1] // 2 + 1)


def direct_flops(hw, c_in: int, c_out: int, kernel, padding) -> int:
    """Multiply-adds x 2 of one image's forward pass by sliding the window."""
    (h, w), (kh, kw), (ph, pw) = _pair(hw), _pair(kernel), _pair(padding)
    return 2 * (h + 2 * ph - kh + 1) * (w + 2 * pw - kw + 1) * kh * kw * c_in * c_out


def spectral_flops(hw, c_in: int, c_out: int, kernel, padding) -> int:
    """The same through the three products above (the filters' DFT, once per batch, left out)."""
    (h, w), (kh, kw), (ph, pw) = _pair(hw), _pair(kernel), _pair(padding)
    f = frequencies(grid((h, w), (ph, pw)))
    out = (h + 2 * ph - kh + 1) * (w + 2 * pw - kw + 1)
    return 2 * (2 * f * h * w * c_in + f * (2 * c_in) * (2 * c_out) + out * 2 * f * c_out)


def supported(kernel, stride, padding, dilation=1, groups=1) -> bool:
    """Stride 1, no dilation or groups, zero padding smaller than the window (outputs then fit the grid)."""
    if isinstance(padding, str):  # nn.Conv2d's "same" / "valid": the network passes pixels
        return False
    (kh, kw), (ph, pw) = _pair(kernel), _pair(padding)
    return (_pair(stride) == (1, 1) and _pair(dilation) == (1, 1) and groups == 1
            and 0 <= ph < kh and 0 <= pw < kw)


def conv2d(c_in: int, c_out: int, kernel: int, stride: int, padding: int, input_hw: tuple[int, int]) -> nn.Conv2d:
    """An nn.Conv2d, or a SpectralConv2d (same parameters) where that takes fewer FLOPs."""
    shape = (input_hw, c_in, c_out, kernel, padding)
    if supported(kernel, stride, padding) and spectral_flops(*shape) < direct_flops(*shape):
        return SpectralConv2d(c_in, c_out, kernel, stride, padding)
    return nn.Conv2d(c_in, c_out, kernel, stride, padding)


def transforms(hw: tuple[int, int], kernel: tuple[int, int], padding: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """T_in (2F, H*W): an image to its spectrum; T_out (H_out*W_out, 2F): a spectrum back to
    the output window. Rows of T_in and columns of T_out are ordered (frequency, real/imag).
    Built by transforming unit impulses with torch.fft, in float64, so they are exactly the DFT."""
    (h, w), (kh, kw), (ph, pw) = hw, kernel, padding
    n = grid(hw, padding)
    f = frequencies(n)
    impulses = torch.zeros(h * w, *n, dtype=torch.float64)
    s = torch.arange(h * w)
    impulses[s, s // w + ph, s % w + pw] = 1.0
    t_in = torch.view_as_real(torch.fft.rfft2(impulses)).reshape(h * w, 2 * f).t()
    unit = torch.zeros(2 * f, f, dtype=torch.complex128)
    unit[2 * torch.arange(f), torch.arange(f)] = 1.0  # real part of frequency f
    unit[2 * torch.arange(f) + 1, torch.arange(f)] = torch.tensor(1j, dtype=torch.complex128)  # imaginary part
    back = torch.fft.irfft2(unit.view(2 * f, n[0], n[1] // 2 + 1), s=n)
    t_out = back[:, : h + 2 * ph - kh + 1, : w + 2 * pw - kw + 1].reshape(2 * f, -1).t()
    return t_in.to(dtype).contiguous(), t_out.to(dtype).contiguous()


def spectral_weight(weight: torch.Tensor, n: tuple[int, int]) -> torch.Tensor:
    """(C_out, C_in, k, k) filters -> (F, 2 C_in, 2 C_out): per frequency, the real matrix of
    multiplying by the conjugate filter spectrum. Rows (real/imag, c_in), columns (real/imag, c_out):
    with W = a + ib, (xr + i xi)(a - ib) = (xr a + xi b) + i(xi a - xr b)."""
    c_out, c_in = weight.shape[:2]
    spec = torch.fft.rfft2(weight, s=n).reshape(c_out, c_in, -1).permute(2, 1, 0)  # (F, C_in, C_out)
    a, b = spec.real, spec.imag
    return torch.cat([torch.cat([a, -b], 2), torch.cat([b, a], 2)], 1)


def spectral_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    padding: tuple[int, int], t_in: torch.Tensor, t_out: torch.Tensor) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=padding) for stride 1, by the three products.
    x (B, C_in, H, W) -> (B, C_out, H_out, W_out), in channels-last memory layout."""
    b_, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    n = grid((h, w), padding)
    f = frequencies(n)
    pixels = x.permute(0, 2, 3, 1).reshape(b_, h * w, c_in)  # a view when x is channels-last
    spectra = torch.matmul(t_in, pixels)  # (B, 2F, C_in)
    per_freq = spectra.view(b_, f, 2 * c_in).transpose(0, 1)  # (F, B, 2 C_in), no copy
    mixed = torch.bmm(per_freq, spectral_weight(weight, n))  # (F, B, 2 C_out)
    mixed = mixed.view(f, b_, 2, c_out).permute(1, 0, 2, 3).reshape(b_, 2 * f, c_out)
    y = torch.matmul(t_out, mixed)  # (B, H_out W_out, C_out)
    if bias is not None:
        y = y + bias
    h_out, w_out = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
    return y.view(b_, h_out, w_out, c_out).permute(0, 3, 1, 2)


class SpectralConv2d(nn.Conv2d):
    """nn.Conv2d whose CPU training forward goes through the frequency domain (see the module
    docstring); parameters, state_dict, evaluation and export are the ordinary convolution's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not supported(self.kernel_size, self.stride, self.padding, self.dilation, self.groups) \
                or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError(f"SpectralConv2d needs stride 1, zero padding < kernel, no dilation or groups: {self}")
        # nn.Conv2d stores 2-D sizes as tuples of two (typed tuple[int, ...]); padding is numeric here
        self._kernel = (self.kernel_size[0], self.kernel_size[1])
        self._pad = (int(self.padding[0]), int(self.padding[1]))
        self._transforms: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and x.device.type == "cpu"):
            return super().forward(x)
        key = (tuple(x.shape[2:]), x.dtype)
        if key not in self._transforms:
            self._transforms[key] = transforms((key[0][0], key[0][1]), self._kernel, self._pad, x.dtype)
        with torch.profiler.record_function("spectral_conv2d"):  # one row in benchmarks.profile
            return spectral_conv2d(x, self.weight, self.bias, self._pad, *self._transforms[key])
