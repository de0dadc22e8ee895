"""Pictures of digits -> MNIST-style input: polarity, size, background, centring, orientation, bad files."""
import io
import struct
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from pipeline import digits, evaluate, runtime


def png(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, fmt)
    return out.getvalue()


def test_frame_is_centred_white_on_black_and_in_range(test_split):
    images, _ = test_split
    frame = digits.image_to_input(png(images[0]))
    assert frame.shape == (1, 1, 28, 28) and frame.dtype == np.float32
    f = frame[0, 0]
    assert 0 <= f.min() and f.max() <= 1 and f.max() > 0.9
    ys, xs = np.indices(f.shape)
    assert abs((ys * f).sum() / f.sum() - 13.5) <= 1 and abs((xs * f).sum() / f.sum() - 13.5) <= 1
    assert f[0].max() == 0 and f[:, 0].max() == 0  # the border stays background


def test_same_digit_in_any_polarity_size_background_or_format_gives_nearly_the_same_frame(test_split):
    digit = test_split[0][7]
    reference = digits.image_to_input(png(digit))[0, 0]
    variants = {
        "dark on white": png(255 - digit),
        "ten times larger JPEG": png(np.asarray(Image.fromarray(255 - digit).resize((280, 280))), fmt="JPEG"),
        "grey background": png((90 + digit * 0.6).astype(np.uint8)),
        "RGB": png(np.repeat(digit[..., None], 3, axis=2)),
        "ink in alpha only": png(np.dstack([np.zeros((28, 28, 3), np.uint8), digit]), "RGBA"),
        "off-centre on a wide canvas": png(np.pad(255 - digit, ((10, 40), (90, 5)), constant_values=255)),
    }
    for name, blob in variants.items():
        frame = digits.image_to_input(blob)[0, 0]
        assert np.abs(frame - reference).mean() < 0.06, name


def test_reframed_digits_sit_where_mnist_puts_them(test_split):
    """MNIST centres each digit's mass at pixel (14, 14); to_mnist aimed at (13.5, 13.5),
    shifting half the digits a pixel up-left of what the network learned (1.4 points of
    accuracy lost). Pure arithmetic on the data: the same on every CPU."""
    images = test_split[0][:1000] / 255.0
    ys, xs = np.indices((28, 28))

    def centre(frames):
        mass = frames.sum((1, 2))
        return np.stack([(ys * frames).sum((1, 2)) / mass, (xs * frames).sum((1, 2)) / mass], 1)
    mnist = centre(images).mean(0)
    reframed = centre(np.stack([digits.to_mnist(im) for im in images])).mean(0)
    assert np.abs(mnist - 14.0).max() < 0.05, mnist  # what MNIST is
    # whole-pixel shifts leave each digit within 0.5 px; on average they cancel to ~0.02 px
    assert np.abs(reframed - mnist).max() < 0.1, (reframed, mnist)


@pytest.mark.integration
def test_real_digits_through_pictures_keep_the_models_accuracy(served_model, test_split):
    """Dark on light, 4x upscaled PNGs of 2,000 test digits, through the whole picture path.
    Measured: 94.50% vs 94.55% direct on this fixture (93.05% before the centring fix).
    Allowed: 1 point (20 digits), 20x what resampling costs here, because the fixture's weights,
    and so which digits sit near a decision boundary, differ from CPU to CPU."""
    images, labels = test_split[0][:2000], test_split[1][:2000]
    session = runtime.open_session(runtime.load_checked(served_model))
    direct = (evaluate.predict_logits(session, images, 500).argmax(1) == labels).mean()
    pictures = np.concatenate([digits.image_to_input(png(np.asarray(Image.fromarray(255 - im).resize((112, 112)))))
                               for im in images])
    via_pictures = (session.run(pictures).argmax(1) == labels).mean()
    assert via_pictures >= direct - 0.01, (via_pictures, direct)


@pytest.mark.parametrize("blob, words", [
    (b"", "empty"),
    (b"GIF89a not really", "not a PNG or JPEG"),
    (b"hello, this is text", "not a PNG or JPEG"),
    (png(np.zeros((28, 28), np.uint8)), "blank"),
    (png(np.full((50, 80), 255, np.uint8)), "blank"),
])
def test_bad_pictures_are_clear_errors(blob, words):
    with pytest.raises(digits.ImageError, match=words):
        digits.image_to_input(blob)


def test_truncated_png_is_a_clear_error(test_split):
    blob = png(np.asarray(Image.fromarray(test_split[0][0]).resize((200, 200))))
    with pytest.raises(digits.ImageError):
        digits.image_to_input(blob[: len(blob) // 2])


def test_a_picture_too_large_to_decode_safely_is_refused():
    blob = png(np.zeros((4100, 4100), np.uint8))  # compresses to a few kB; decoded it would be 16.8 MP
    with pytest.raises(digits.ImageError, match="at most"):
        digits.image_to_input(blob)


# Which way EXIF orientation 1..8 says the stored pixels must be turned to be upright, undone:
# a picture stored this way, with that tag, is the upright one once the tag is applied.
STORED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
          7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def photo(digit: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    """A real digit as a phone stores it: dark on light, 4x larger, the pixels turned as the
    camera held them, and an EXIF orientation tag saying how to turn them back."""
    upright = Image.fromarray(255 - digit).resize((112, 112), Image.Resampling.BICUBIC)
    stored = upright if STORED[orientation] is None else upright.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    out = io.BytesIO()
    stored.save(out, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


@pytest.mark.integration  # the served_model fixture trains a model
def test_phone_photos_stored_turned_with_an_exif_orientation_are_read_upright(served_model, test_split):
    """50 real test digits, each saved as a JPEG in each of the 8 EXIF orientations (and turned a
    quarter as a PNG, which carries EXIF too): each gives the frame and the digit of the upright photo.
    Read as stored, the sideways and mirrored ones were mostly wrong (9 of 50 right)."""
    images = test_split[0][:50]
    session = runtime.open_session(runtime.load_checked(served_model))
    upright = np.concatenate([digits.image_to_input(photo(im, 1)) for im in images])
    for orientation, fmt in [(o, "JPEG") for o in range(2, 9)] + [(6, "PNG")]:
        frames = np.concatenate([digits.image_to_input(photo(im, orientation, fmt)) for im in images])
        assert np.abs(frames - upright).mean() < 0.01, (orientation, fmt)  # JPEG's blocks fall elsewhere
        assert (session.run(frames).argmax(1) == session.run(upright).argmax(1)).all(), (orientation, fmt)


def fuzz_seeds() -> dict[str, bytes]:
    """One small picture of a digit in each format Pillow writes here without extra tools."""
    digit = np.zeros((28, 28), np.uint8)
    digit[5:23, 13:16] = 255
    digit[5:8, 8:20] = 255  # a 7
    seeds = {}
    for fmt, mode in [("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "L"), ("JPEG", "RGB"), ("TIFF", "L"),
                      ("DDS", "RGBA"), ("SPIDER", "F"), ("BMP", "L"), ("GIF", "L"), ("WEBP", "L"), ("ICO", "L"),
                      ("PCX", "L"), ("TGA", "L"), ("PPM", "L"), ("SGI", "L"), ("IM", "L"), ("MSP", "1"), ("XBM", "1"),
                      ("QOI", "RGBA"), ("JPEG2000", "L")]:
        out = io.BytesIO()
        try:
            Image.fromarray(digit).convert(mode).save(out, fmt)
        except (OSError, KeyError, ValueError):  # a codec this Pillow was built without
            continue
        seeds[f"{fmt} {mode}"] = out.getvalue()
    return seeds


FIELD_VALUES = (0, 1, 2, 3, 5, 7, 8, 11, 12, 16, 255, 256, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 10**6)
FLOAT_VALUES = (-1.0, 0.5, 1.0, 2.0, 15.0, 1e30)


def mutated_images(count: int, seed: int = 0, formats: tuple[str, ...] | None = None):
    """``count`` (name, bytes): the seeds (of ``formats``, default all), each with one to three
    mutations: a byte changed, cut short, bytes inserted, or a header field set to a value
    parsers treat specially: at an aligned
    offset among the first 128 bytes, a 16- or 32-bit integer or a 32-bit float, either byte
    order. With all formats, half are PNG or JPEG, whose decoders run on every case; the rest
    are other formats' headers."""
    rng = np.random.default_rng(seed)
    seeds = {k: v for k, v in fuzz_seeds().items() if formats is None or k.split()[0] in formats}
    ours = [k for k in seeds if k.startswith(("PNG", "JPEG "))]
    others = [k for k in seeds if k not in ours] or ours
    for i in range(count):
        names = ours if i % 2 else others
        name = names[(i // 2) % len(names)]
        b = bytearray(seeds[name])
        for _ in range(rng.integers(1, 4)):  # one to three mutations
            kind = rng.integers(5)
            if kind == 0:
                b[rng.integers(len(b))] = rng.integers(256)
            elif kind == 1:
                b = b[:rng.integers(1, max(2, len(b)))]
            elif kind == 2:
                order = rng.choice(["<", ">"])
                field = struct.pack(order + "f", rng.choice(FLOAT_VALUES)) if rng.integers(3) == 0 else \
                    struct.pack(order + "I", int(rng.choice(FIELD_VALUES)))
                at = 4 * int(rng.integers(32))
                b[at:at + 4] = field
            elif kind == 3:
                at = 2 * int(rng.integers(64))
                b[at:at + 2] = struct.pack(rng.choice(["<H", ">H"]), int(rng.choice(FIELD_VALUES)) & 0xFFFF)
            else:
                at = int(rng.integers(len(b)))
                b[at:at] = rng.bytes(int(rng.integers(1, 16)))
        yield name, bytes(b)


def test_mutated_images_of_many_formats_are_read_or_refused_never_anything_else():
    """3,000 mutated pictures of 15 formats: each is read, or refused with an ImageError (the
    service's 400 or 422); any other exception is what the service answered 500. Before, Pillow
    opened every format it knows, and 3 of these DDS files raised NotImplementedError."""
    crashed: dict[str, str] = {}
    slowest = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd files it still reads
        for name, blob in mutated_images(3000):
            t0 = time.perf_counter()
            try:
                digits.image_to_input(blob)
            except digits.ImageError as e:
                assert str(e)
            except Exception as e:  # noqa: BLE001 - what the test is looking for
                crashed.setdefault(f"{name}: {type(e).__name__}", str(e)[:100])
            slowest = max(slowest, time.perf_counter() - t0)
    assert not crashed, crashed
    assert slowest < 2, slowest  # no case hangs a decoder (measured: under 0.1 s each)


def test_a_well_formed_picture_of_another_format_is_refused_naming_the_ones_read():
    """Only PNG and JPEG are opened: every other format Pillow knows is one more parser facing
    the network (a mutated DDS, SPIDER or TIFF gave 500s). A valid TIFF, BMP, GIF, ... of a
    digit is refused before any decoder of its format runs; the seeds' PNG and JPEG are read."""
    seeds = fuzz_seeds()
    assert len(seeds) >= 10  # the formats this Pillow writes
    for name, blob in seeds.items():
        if name.startswith(("PNG", "JPEG ")):
            assert digits.image_to_input(blob).shape == (1, 1, 28, 28), name
        else:
            with pytest.raises(digits.ImageError, match="not a PNG or JPEG image"):
                digits.image_to_input(blob)
