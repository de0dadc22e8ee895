"""The static INT8 model: per-channel INT8 weights, UINT8 activations, QDQ format.

Calibrated on real training digits (min/max of every activation), so its ranges are those
the model meets. ``reduce_range`` keeps weights to 7 bits, which avoids the saturation of
U8S8 products on CPUs without VNNI (AVX2). Exported in the tutorial's conv -> ReLU -> pool
order, the whole network runs in integers from the input's QuantizeLinear to the logits'
DequantizeLinear (see pipeline/export.py).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from pipeline import atomic, contract
from pipeline.params import require


@dataclass(frozen=True)
class QuantizeConfig:
    calibration_images: int = 512  # training images whose activations set the INT8 ranges

    def __post_init__(self) -> None:
        require(self.calibration_images >= 1, "quantize.calibration_images", self.calibration_images,
                "a whole number >= 1")


def quantize_int8(model_path: str | os.PathLike, out_path: str | os.PathLike, calibration: np.ndarray) -> None:
    """Write the INT8 version of ``model_path`` to ``out_path``, calibrated on ``calibration``
    (the model's input: float32 (N, 1, 28, 28) in [0, 1]), carrying the source's metadata."""
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{contract.INPUT_NAME: calibration[i:i + 64]}
                                 for i in range(0, len(calibration), 64)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre, int8 = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        q.quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=False)
        q.quantize_static(str(pre), str(int8), Reader(), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, reduce_range=True, activation_type=q.QuantType.QUInt8,
                          weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax)
        proto, source = onnx.load(str(int8)), onnx.load(str(model_path))
    # the same provenance and input contract as the model it was made from
    proto.producer_name, proto.producer_version = source.producer_name, source.producer_version
    del proto.metadata_props[:]
    proto.metadata_props.extend(source.metadata_props)
    atomic.write_bytes(out_path, proto.SerializeToString())
