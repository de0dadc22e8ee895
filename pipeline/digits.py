"""Any picture of a digit -> the network's input, the way MNIST itself was made.

MNIST digits are white on black, scaled so the longer side of the ink's bounding box is
20 pixels (aspect ratio kept), and placed in a 28x28 frame so the ink's centre of mass
sits in the middle (LeCun et al.). A photo or a drawing arrives at any size, on any
background, often dark on light, and a phone's photo stored sideways with an EXIF tag that
says which way is up; we undo each difference in that order.

Only PNG and JPEG are read. Pillow can open 43 formats, and each is one more parser facing
whatever a client sends: mutated TIFF, DDS and SPIDER files made it raise TypeError,
NotImplementedError and AttributeError (the fuzz tests in tests/test_digits.py and
tests/test_serve.py find the last two), not the errors it documents. So it is told which
formats to try, and whatever its decoders raise on a client's bytes is an ``ImageError``.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import contract
from pipeline.errors import PipelineError

FORMATS = ("PNG", "JPEG")  # what the service and commands.predict read; nothing else is even identified
MAX_PIXELS = 4096 * 4096  # a decompression bomb is refused before it is decoded
MAX_SIDE = 1024  # larger pictures are shrunk to this before any arithmetic: a digit needs no more
INK_THRESHOLD = 0.2  # fraction of full intensity that counts as ink when cropping
SIDE, BOX = contract.SIDE, 20  # MNIST's frame and the box its digits are scaled into
CENTRE = 14.0  # MNIST's centre of mass, in pixel indices (row and column)


class ImageError(PipelineError, ValueError):
    """Bytes that are not a decodable image, or an image with no digit in it."""


def read_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of an image file, refused past ``max_bytes`` without reading the rest
    (a path such as /dev/zero never ends)."""
    with open(path, "rb") as f:
        blob = f.read(max_bytes + 1)
    if len(blob) > max_bytes:
        raise ImageError(f"larger than the limit of {max_bytes:,} bytes (serve.max_body_bytes)")
    return blob


def decode(blob: bytes) -> np.ndarray:
    """PNG or JPEG bytes -> float32 grey levels in [0, 1], shape (H, W), upright; alpha is composited.

    The pixel count is checked from the header before anything is decoded, and a picture
    larger than MAX_SIDE is shrunk while still 8-bit: at most one copy of the full picture
    is ever held (a 4096x4096 RGBA PNG: 64 MB, not the 300 MB its floats would take). The
    EXIF orientation is applied to the shrunk picture (a square bound fits it either way up)."""
    if not blob:
        raise ImageError("empty image")
    try:
        with Image.open(io.BytesIO(blob), formats=FORMATS) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"image is {img.width}x{img.height}; at most {MAX_PIXELS:,} pixels")
            img.draft("L", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that is enough
            alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
            small = (img.convert("RGBA") if img.mode in ("P", "PA") and alpha else img).convert("LA" if alpha else "L")
        small.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)  # keeps the aspect ratio; never enlarges
        ImageOps.exif_transpose(small, in_place=True)  # the EXIF tag travels with the converted copy
        pixels = np.asarray(small, np.float32) / contract.PIXEL_MAX
    except UnidentifiedImageError:
        raise ImageError(f"not a {' or '.join(FORMATS)} image (the only formats read)") from None
    except (ImageError, MemoryError):  # ours; and running out of memory is not the client's mistake
        raise
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises on a client's bytes is the bytes' fault
        raise ImageError(f"the image could not be decoded ({type(e).__name__}: {str(e)[:200]})") from None
    if not alpha:
        return pixels
    grey, opacity = pixels[..., 0], pixels[..., 1]
    # Transparent pixels are background: put them on the opposite of the ink's colour.
    inked = opacity > 0.5
    background = 1.0 if inked.any() and grey[inked].mean() < 0.5 else 0.0
    return (grey * opacity + background * (1 - opacity)).astype(np.float32)


def to_mnist(grey: np.ndarray) -> np.ndarray:
    """Grey levels (H, W) in [0, 1] -> a 28x28 MNIST-style frame, white digit on black."""
    # The background is whatever fills the border; MNIST's is black, so a light one is inverted.
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    light = np.median(border) > 0.5
    ink = 1.0 - grey if light else grey
    ink = np.clip(ink - (1.0 - np.median(border) if light else np.median(border)), 0.0, None)  # grey -> black
    peak = ink.max()
    if peak <= 0.05:
        raise ImageError("the image is blank: no digit found")
    ink /= peak

    rows = np.flatnonzero((ink > INK_THRESHOLD).any(1))
    cols = np.flatnonzero((ink > INK_THRESHOLD).any(0))
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # (h, w) bounding box of the ink
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL wants (width, height)
    small = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS), np.float32)
    small = np.clip(small, 0.0, 1.0)  # (<=20, <=20)

    frame = np.zeros((SIDE, SIDE), np.float32)
    top, left = (SIDE - small.shape[0]) // 2, (SIDE - small.shape[1]) // 2
    frame[top:top + small.shape[0], left:left + small.shape[1]] = small
    # Shift the centre of mass to where MNIST has it (whole pixels, clipped to fit): pixel
    # (14, 14), measured over the test set at 13.99 / 14.00, not the frame's middle (13.5). At
    # 13.5 half the digits sat a pixel up-left of what the network learned: -1.4 points.
    ys, xs = np.indices(frame.shape)
    mass = frame.sum()
    dy = int(round(CENTRE - (ys * frame).sum() / mass))
    dx = int(round(CENTRE - (xs * frame).sum() / mass))
    dy = int(np.clip(dy, -top, SIDE - top - small.shape[0]))
    dx = int(np.clip(dx, -left, SIDE - left - small.shape[1]))
    return np.roll(frame, (dy, dx), axis=(0, 1))


def image_to_input(blob: bytes) -> np.ndarray:
    """Image bytes -> the model's input, shape (1, 1, 28, 28), float32 in [0, 1]."""
    return to_mnist(decode(blob))[None, None]
