"""The convolution arithmetic of the TensorFlow tutorial, as plain functions.

Output size of a convolution or pooling window: ``(W - F + 2P) / S + 1`` for an input of
width W, window F, padding P on each side and stride S. TensorFlow's padding modes:
``VALID`` is P = 0; ``SAME`` pads (possibly one more on the bottom/right) so that the
output is ceil(W / S). Any other padding must tile exactly: a fractional or non-positive
size is an error that shows the formula with its numbers.

Parameter counts, with weight sharing (one filter bank for all positions) and without it
(a separate filter for every output position, as in a locally connected layer):
    shared:    (F * F * D_in + 1) * K
    unshared:  (F * F * D_in + 1) * (H_out * W_out * K)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from pipeline.errors import PipelineError

Padding = int | str  # an explicit P per side, or "same" / "valid"


class ShapeError(PipelineError, ValueError):
    """A layer configuration that does not tile its input."""


def same_padding(w: int, f: int, s: int) -> tuple[int, int]:
    """TensorFlow SAME padding (before, after) along one axis; the extra pixel goes after."""
    out = math.ceil(w / s)
    total = max((out - 1) * s + f - w, 0)
    return total // 2, total - total // 2


def padding_pair(w: int, f: int, s: int, padding: Padding) -> tuple[int, int]:
    """Padding (before, after) along one axis for any padding spec."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "same":
            return same_padding(w, f, s)
        if mode == "valid":
            return 0, 0
        raise ShapeError(f"padding must be 'same', 'valid' or a whole number >= 0, got {padding!r}")
    if padding < 0:
        raise ShapeError(f"padding must be >= 0, got {padding}")
    return padding, padding


def formula(w: int, f: int, s: int, padding: Padding) -> str:
    """The tutorial's formula with the numbers in it, e.g. '(32 - 8 + 2*1)/2 + 1 = 14'."""
    before, after = padding_pair(w, f, s, padding)
    pad = f"2*{before}" if before == after else f"{before}+{after}"
    value = Fraction(w - f + before + after, s) + 1
    shown = str(value.numerator) if value.denominator == 1 else f"{float(value):g}"
    return f"({w} - {f} + {pad})/{s} + 1 = {shown}"


def output_size(w: int, f: int, s: int = 1, padding: Padding = 0) -> int:
    """Output width of a window F with stride S over width W; raises ShapeError if it doesn't tile."""
    for name, v in (("input size W", w), ("window F", f), ("stride S", s)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ShapeError(f"{name} must be a whole number >= 1, got {v!r}")
    before, after = padding_pair(w, f, s, padding)
    if isinstance(padding, str) and padding.lower() == "same":
        return math.ceil(w / s)  # TensorFlow's definition; formula() shows the padding it implies
    span = w - f + before + after
    if span < 0:
        raise ShapeError(
            f"window {f} is larger than the padded input {w + before + after}: {formula(w, f, s, padding)}"
        )
    if span % s:
        raise ShapeError(f"stride {s} does not tile the input: {formula(w, f, s, padding)} is not a whole number")
    return span // s + 1


def conv_params(f: int, d_in: int, k: int, out_hw: tuple[int, int] | None = None) -> int:
    """Parameters of a conv layer: shared weights, or unshared over ``out_hw`` positions."""
    per_filter = f * f * d_in + 1  # weights + bias
    positions = 1 if out_hw is None else out_hw[0] * out_hw[1]
    return per_filter * positions * k


def dense_params(n_in: int, n_out: int) -> int:
    return (n_in + 1) * n_out


@dataclass(frozen=True)
class Layer:
    """One row of the network table: what a layer outputs and what it costs."""

    name: str  # conv1, pool1, ..., flatten, fc1, logits
    op: str  # Conv, MaxPool, Flatten, Gemm (the ONNX op it exports to)
    shape: tuple[int, ...]  # output shape without the batch axis: (C, H, W) or (units,)
    params: int
    detail: str  # the arithmetic, e.g. "(28 - 5 + 2*2)/1 + 1 = 28"
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # (top, left, bottom, right), convs only


def plan(
    input_hw: int,
    in_channels: int,
    channels: tuple[int, ...],
    kernel: int,
    stride: int,
    padding: Padding,
    pool: int,
    pool_stride: int,
    fc_units: int,
    num_classes: int,
) -> list[Layer]:
    """Predict every layer's output shape and parameter count, or raise ShapeError naming the layer."""
    layers: list[Layer] = []
    c, hw = in_channels, input_hw
    for i, k in enumerate(channels, start=1):
        try:
            out = output_size(hw, kernel, stride, padding)
        except ShapeError as e:
            raise ShapeError(f"conv{i} on {hw}x{hw}x{c}: {e}") from None
        before, after = padding_pair(hw, kernel, stride, padding)
        layers.append(Layer(f"conv{i}", "Conv", (k, out, out), conv_params(kernel, c, k),
                            formula(hw, kernel, stride, padding), (before, before, after, after)))
        c, hw = k, out
        try:
            out = output_size(hw, pool, pool_stride, 0)
        except ShapeError as e:
            raise ShapeError(f"pool{i} on {hw}x{hw}x{c}: {e}") from None
        layers.append(Layer(f"pool{i}", "MaxPool", (c, out, out), 0, formula(hw, pool, pool_stride, 0)))
        hw = out
    flat = c * hw * hw
    layers.append(Layer("flatten", "Flatten", (flat,), 0, f"{c}*{hw}*{hw} = {flat}"))
    layers.append(Layer("fc1", "Gemm", (fc_units,), dense_params(flat, fc_units),
                        f"({flat} + 1)*{fc_units}"))
    layers.append(Layer("logits", "Gemm", (num_classes,), dense_params(fc_units, num_classes),
                        f"({fc_units} + 1)*{num_classes}"))
    return layers


# ---------------------------------------------------------------------------- the calculator


def _parse_volume(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ShapeError(f"a volume is written WxHxD, like 32x32x3; got {text!r}")
    w, h, d = (int(p) for p in parts)
    return w, h, d


def explain_conv(volume: str, filters: int, kernel: int, stride: int, padding: Padding) -> str:
    """The tutorial's worked example for a conv layer, as text: formula, numbers, result."""
    w, h, d = _parse_volume(volume)
    ow, oh = output_size(w, kernel, stride, padding), output_size(h, kernel, stride, padding)
    pw = padding_pair(w, kernel, stride, padding)
    shared = conv_params(kernel, d, filters)
    unshared = conv_params(kernel, d, filters, (oh, ow))
    return "\n".join([
        f"conv: input {w}x{h}x{d}, {filters} filters of {kernel}x{kernel}x{d}, stride {stride}, padding {padding}"
        + (f" (P = {pw[0]}+{pw[1]})" if isinstance(padding, str) else ""),
        f"  output width   (W - F + 2P)/S + 1 = {formula(w, kernel, stride, padding)}",
        f"  output height  (H - F + 2P)/S + 1 = {formula(h, kernel, stride, padding)}",
        f"  output volume  {ow}x{oh}x{filters}",
        f"  parameters with weight sharing     (F*F*D + 1)*K = ({kernel}*{kernel}*{d} + 1)*{filters} = {shared:,}",
        f"  parameters without weight sharing  (F*F*D + 1)*(W_out*H_out*K) = "
        f"({kernel}*{kernel}*{d} + 1)*({ow}*{oh}*{filters}) = {unshared:,}",
    ])


def explain_pool(volume: str, window: int, stride: int) -> str:
    w, h, d = _parse_volume(volume)
    ow, oh = output_size(w, window, stride, 0), output_size(h, window, stride, 0)
    return "\n".join([
        f"max pool: input {w}x{h}x{d}, {window}x{window} window, stride {stride}",
        f"  output width   (W - F)/S + 1 = {formula(w, window, stride, 0)}",
        f"  output height  (H - F)/S + 1 = {formula(h, window, stride, 0)}",
        f"  output volume  {ow}x{oh}x{d} (pooling keeps the depth; 0 parameters)",
    ])


def main(argv: list[str] | None = None) -> int:
    """convcalc: the tutorial's arithmetic from the command line."""
    import argparse
    import sys

    def pad(text: str) -> Padding:
        return int(text) if text.isdigit() else text.lower()

    p = argparse.ArgumentParser(prog="convcalc", description="Output size and parameter count of "
                                "conv and pooling layers: (W - F + 2P)/S + 1.")
    sub = p.add_subparsers(dest="kind", required=True)
    c = sub.add_parser("conv", help="a convolution layer")
    c.add_argument("--input", required=True, help="input volume WxHxD, e.g. 32x32x3")
    c.add_argument("--filters", type=int, required=True, help="K, the number of filters")
    c.add_argument("--kernel", type=int, required=True, help="F, the filter's width")
    c.add_argument("--stride", type=int, default=1, help="S (default 1)")
    c.add_argument("--padding", type=pad, default=0, help="P per side, or same / valid (default 0)")
    q = sub.add_parser("pool", help="a max-pooling layer")
    q.add_argument("--input", required=True, help="input volume WxHxD, e.g. 4x4x5")
    q.add_argument("--window", type=int, default=2, help="F (default 2)")
    q.add_argument("--stride", type=int, default=2, help="S (default 2)")
    args = p.parse_args(argv)
    try:
        if args.kind == "conv":
            print(explain_conv(args.input, args.filters, args.kernel, args.stride, args.padding))
        else:
            print(explain_pool(args.input, args.window, args.stride))
    except ShapeError as e:
        print(f"convcalc: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
