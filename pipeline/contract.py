"""The model's contract, written once: what goes in, what comes out, what it is called.

Input: float32 ``[N, 1, 28, 28]`` named ``image``, pixels in [0, 1], white digit on black
(MNIST as published, divided by 255). Output: float32 ``[N, 10]`` logits named ``logits``,
one per class ``0``..``9``. The registered name (``registry.model_name``) is also the
model's name in the v2 inference API and in the Triton repository.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.params import require

SIDE = 28  # MNIST images are 28x28 pixels, one channel
PIXEL_MAX = 255.0  # MNIST's 8-bit grey levels; the model's input is pixel / PIXEL_MAX, in [0, 1]
CLASSES = 10
LABELS = tuple(str(d) for d in range(CLASSES))
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000  # MNIST's two splits
INPUT_NAME, OUTPUT_NAME = "image", "logits"
DEFAULT_MODEL = Path("models/model.onnx")  # what the commands load when not told (dvc.yaml's export out)
PIXELS = (0.0, 1.0)  # the range of every input value; the service refuses a request outside it
PRODUCER = "mnist-onnx"  # the model file's producer_name: this project
# The contract as the model file states it (its metadata_props, beside the provenance).
INPUT_CONTRACT = {
    "input_name": INPUT_NAME, "input_shape": f"N,1,{SIDE},{SIDE}", "input_layout": "NCHW",
    "input_dtype": "float32", "input_range": f"[{PIXELS[0]:g}, {PIXELS[1]:g}] (MNIST pixels / 255)",
    "input_polarity": "white digit on black", "output_name": OUTPUT_NAME, "output": "logits, one per label",
    "labels": ",".join(LABELS),
}


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str = "mnist-cnn-onnx"  # the registered model; its name in the v2 API and in Triton

    def __post_init__(self) -> None:
        require(bool(self.model_name.strip()) and "/" not in self.model_name, "registry.model_name",
                self.model_name, "a non-empty name without '/'")


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, 28, 28), 0..255 -> the model's input, float32 (N, 1, 28, 28) in [0, 1]."""
    return (images.astype(np.float32) / PIXEL_MAX)[:, None, :, :]
