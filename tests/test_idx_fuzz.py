"""Property tests and a short fuzz run of the IDX parser: only IDXError, never another exception."""
from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import data


def valid_idx(dims: list[int]) -> bytes:
    return struct.pack(">HBB", 0, 8, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + bytes(int(np.prod(dims)))


def parses_or_refuses_clearly(blob: bytes) -> None:
    try:
        arr = data.parse_idx(blob, "fuzz")
    except data.IDXError as e:
        assert str(e).startswith("fuzz: ")
    else:  # whatever parses must be exactly consistent with its header
        ndim = blob[3]
        dims = struct.unpack(f">{ndim}I", blob[4:4 + 4 * ndim])
        assert arr.shape == dims and len(blob) == 4 + 4 * ndim + arr.size


dims = st.lists(st.integers(0, 6), min_size=1, max_size=4)


@settings(max_examples=500, deadline=None)
@given(dims, st.data())
def test_mutated_headers(d, draw):
    blob = bytearray(valid_idx(d))
    for _ in range(draw.draw(st.integers(1, 4))):
        i = draw.draw(st.integers(0, min(len(blob), 4 + 4 * len(d)) - 1))
        blob[i] = draw.draw(st.integers(0, 255))
    parses_or_refuses_clearly(bytes(blob))


@settings(max_examples=300, deadline=None)
@given(dims, st.integers(0, 400), st.binary(max_size=8))
def test_truncated_and_extended_payloads(d, cut, extra):
    blob = valid_idx(d)
    parses_or_refuses_clearly(blob[:max(0, len(blob) - cut)] + extra)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes(blob):
    parses_or_refuses_clearly(blob)


def test_huge_dimensions_are_refused_without_allocating():
    for dims in ([2**31, 2**31, 2**31], [0, 2**24, 2**24]):  # the second: zero items, absurd shape
        blob = struct.pack(">HBB3I", 0, 8, 3, *dims) + bytes(16)
        with pytest.raises(data.IDXError, match="larger than any MNIST file"):
            data.parse_idx(blob, "fuzz")


def test_short_fuzz_run_on_real_labels(raw_dir):
    """A few thousand random byte flips, cuts and splices of a real MNIST file."""
    real = (raw_dir / "t10k-labels-idx1-ubyte").read_bytes()
    rng = random.Random(0)
    for _ in range(3000):
        blob = bytearray(real[: rng.randint(0, 200)] if rng.random() < 0.3 else real)
        for _ in range(rng.randint(1, 6)):
            if blob:
                blob[rng.randrange(min(len(blob), 16))] = rng.randrange(256)
        parses_or_refuses_clearly(bytes(blob))
