"""The convolutional network of the TensorFlow MNIST tutorial ("Deep MNIST for Experts").

conv 5x5x32 SAME + ReLU -> max pool 2x2 -> conv 5x5x64 SAME + ReLU -> max pool 2x2
-> fc 1024 + ReLU -> dropout -> fc 10 (logits). Widths, kernel, stride, padding and pooling
come from ModelConfig, and every shape is predicted by pipeline.shapes before a layer is
built, so an architecture that doesn't tile fails here, before any training starts.

Input contract (also of the exported ONNX model): float32 (N, 1, 28, 28), pixel values in
[0, 1], white digit on black, as in MNIST.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import contract, shapes, spectral
from pipeline.params import ParamError, require


@dataclass(frozen=True)
class ModelConfig:
    channels: tuple[int, ...] = (32, 64)  # filters of each conv layer; each is followed by a pool
    kernel: int = 5  # F, the conv window
    stride: int = 1  # S of the convs
    padding: str | int = "same"  # "same", "valid" or P pixels per side
    pool: int = 2  # max-pool window
    pool_stride: int = 2
    fc_units: int = 1024
    dropout: float = 0.5  # probability of dropping a unit of fc1 during training

    def __post_init__(self) -> None:
        require(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "model.channels",
                list(self.channels), "a non-empty list of whole numbers >= 1")
        for key in ("kernel", "stride", "pool", "pool_stride", "fc_units"):
            require(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "a whole number >= 1")
        if isinstance(self.padding, str):
            require(self.padding in ("same", "valid"), "model.padding", self.padding,
                    "'same', 'valid' or a whole number >= 0")
        else:
            require(self.padding >= 0, "model.padding", self.padding, "'same', 'valid' or a whole number >= 0")
        require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a probability in [0, 1)")
        try:
            self.layers()
        except shapes.ShapeError as e:
            side = contract.SIDE
            raise ParamError(f"model: this architecture does not fit a {side}x{side} image: {e}") from None

    def describe(self) -> str:
        """The architecture in one line, as the tutorial writes it: 'conv 5x5x32 -> max pool 2x2 -> ...'
        (stride and padding said where they are not the tutorial's 1 and SAME)."""
        conv = f"conv {self.kernel}x{self.kernel}x{{}}"
        if self.stride != 1:
            conv += f" stride {self.stride}"
        if self.padding != "same":
            conv += f" padding {self.padding}"
        pool = f"max pool {self.pool}x{self.pool}"
        if self.pool_stride != self.pool:
            pool += f" stride {self.pool_stride}"
        layers = [part for c in self.channels for part in (conv.format(c), pool)]
        return " -> ".join([*layers, f"fc {self.fc_units}", f"dropout {self.dropout:g}", f"fc {contract.CLASSES}"])

    def layers(self) -> list[shapes.Layer]:
        """The predicted network table (raises shapes.ShapeError if it doesn't tile)."""
        return shapes.plan(contract.SIDE, 1, self.channels, self.kernel, self.stride, self.padding,
                           self.pool, self.pool_stride, self.fc_units, contract.CLASSES)


class Net(nn.Module):
    """The network. ``relu_before_pool`` picks between two orders of the same function:
    max(relu(a), relu(b)) == relu(max(a, b)) exactly, since ReLU is monotonic.

    - False (training): pool, then ReLU: ReLU and its gradient on 4x fewer values, 1.3x faster
      training steps on a 2-core CPU (measured).
    - True (export): the tutorial's conv -> ReLU -> pool, the pattern inference engines fuse:
      onnxruntime folds the ReLU into the FP32 convolution, and in the INT8 model into the
      quantised convolution, whose uint8 output is then pooled without leaving uint8.

    Both have the same parameters under the same names, so one state_dict loads into either.

    ``spectral_convs``: convolutions whose arithmetic is cheaper in the frequency domain (conv2
    with the defaults) train there on a CPU (pipeline.spectral); evaluation and export always
    run the ordinary convolution. False builds plain nn.Conv2d layers throughout.
    """

    def __init__(self, cfg: ModelConfig = ModelConfig(), relu_before_pool: bool = False,
                 spectral_convs: bool = True):
        super().__init__()
        self.cfg = cfg
        self.relu_before_pool = relu_before_pool
        self.spectral_convs = spectral_convs
        plan = {layer.name: layer for layer in cfg.layers()}
        blocks = []
        in_c, in_hw = 1, (contract.SIDE, contract.SIDE)  # (H, W) of the next layer's input
        for i, out_c in enumerate(cfg.channels, start=1):
            top, left, bottom, right = plan[f"conv{i}"].pads
            symmetric = top == bottom and left == right
            if not symmetric:
                in_hw = (in_hw[0] + top + bottom, in_hw[1] + left + right)
            pad = top if symmetric else 0
            blocks += [
                # SAME with an even window pads one more pixel after than before (TensorFlow's
                # rule); an explicit ZeroPad2d keeps that exact, a symmetric pad stays in the Conv.
                nn.Identity() if symmetric else nn.ZeroPad2d((left, right, top, bottom)),
                # nn.Conv2d, or where it is cheaper, its frequency-domain variant for training
                spectral.conv2d(in_c, out_c, cfg.kernel, cfg.stride, pad, in_hw) if spectral_convs
                else nn.Conv2d(in_c, out_c, cfg.kernel, cfg.stride, pad),
                *((nn.ReLU(), nn.MaxPool2d(cfg.pool, cfg.pool_stride)) if relu_before_pool
                  else (nn.MaxPool2d(cfg.pool, cfg.pool_stride), nn.ReLU())),
            ]
            _, pooled_h, pooled_w = plan[f"pool{i}"].shape
            in_c, in_hw = out_c, (pooled_h, pooled_w)
        self.features = nn.Sequential(*blocks)
        flat = plan["flatten"].shape[0]
        self.fc1 = nn.Linear(flat, cfg.fc_units)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.fc_units, contract.CLASSES)

    @classmethod
    def from_weights(cls, cfg: ModelConfig, path: str | os.PathLike) -> Net:
        """The network of ``cfg`` with the trained weights at ``path`` (a state_dict file, loaded
        with weights_only: no pickled code runs), on the CPU, in evaluation mode."""
        net = cls(cfg)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval()

    def in_tutorial_order(self) -> Net:
        """This network with the same weights, ReLU before each pool: what the export writes."""
        net = Net(self.cfg, relu_before_pool=True, spectral_convs=self.spectral_convs).to(self.fc1.weight.device)
        net.load_state_dict(self.state_dict())
        return net.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 1, 28, 28)
        x = self.features(x)  # (N, 64, 7, 7) with the defaults
        x = torch.flatten(x, 1)  # (N, 3136)
        x = self.dropout(torch.relu(self.fc1(x)))  # (N, 1024)
        return self.out(x)  # (N, 10) logits


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
