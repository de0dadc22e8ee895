"""What the service lets in (serving/admission.py, serving/transport.py), as pure functions: compressed
bodies, the request-head guard."""
import gzip
import zlib

import pytest

from serving import transport
from serving.admission import content_encoding, inflate
from serving.protocol import RequestError

BODY = (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": ['
        + b"0.5," * 783 + b"0]}]}")


def test_gzip_and_deflate_bodies_decompress_as_tritonclient_sends_them():
    # tritonclient: gzip.compress for "gzip", zlib.compress for "deflate"
    assert inflate(gzip.compress(BODY), "gzip", len(BODY)) == BODY
    assert inflate(zlib.compress(BODY), "deflate", len(BODY)) == BODY
    assert content_encoding(" GZIP ") == "gzip"
    assert content_encoding("identity") is None and content_encoding(None) is None


def gzip_bomb(size: int) -> bytes:
    """``size`` bytes of zeros as gzip, compressed a MiB at a time."""
    packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(2**20)
    return b"".join(packer.compress(zeros) for _ in range(size // 2**20)) + packer.flush()


def test_a_gzip_bomb_is_refused_once_its_output_passes_the_limit():
    bomb = gzip_bomb(64 * 2**20)  # 64 MiB of zeros
    with pytest.raises(RequestError, match="decompressed is over the limit of 16,777,216 bytes") as e:
        inflate(bomb, "gzip", 16 * 2**20)  # stops after 16 MiB + 1 byte of output
    assert e.value.status == 413 and len(bomb) < 2**20


@pytest.mark.parametrize("blob, words", [
    (gzip.compress(BODY)[:-20], "cut short"),
    (gzip.compress(BODY) + b"junk", "4 bytes follow the end"),
    (b"not gzip at all", "not valid gzip data"),
])
def test_broken_gzip_is_a_400_that_says_what_is_wrong(blob, words):
    with pytest.raises(RequestError, match=words) as e:
        inflate(blob, "gzip", 10**6)
    assert e.value.status == 400


@pytest.mark.parametrize("header", ["br", "gzip, deflate", "compress"])
def test_an_encoding_we_do_not_decode_is_a_415_that_names_it(header):
    with pytest.raises(RequestError, match=f"Content-Encoding '{header}' is not supported") as e:
        content_encoding(header)
    assert e.value.status == 415


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["CRLF", "LF"])
def test_the_request_head_guard_counts_header_fields_as_h11_reads_them(eol):
    """h11 also ends lines at a bare LF: a head of 1,500 LF-ended headers (12 KB) passed a guard
    that looked only for CRLF, and h11 parsed every field. Both endings are counted alike, and
    a small head followed by a large body in the same read is not taken for a long head."""
    def head(n: int) -> bytes:
        return b"GET /v2 HTTP/1.1" + eol + b"".join(b"X%d: y" % i + eol for i in range(n)) + eol
    assert transport.head_problem(head(1_500)) == "1,500 header fields; at most 100"
    assert transport.head_problem(head(101)) == "101 header fields; at most 100"
    assert transport.head_problem(head(100)) is None
    assert transport.head_problem(head(5) + b"x" * 20_000) is None  # the body is not part of the head
    assert transport.head_problem(head(5)[:-len(eol)]) is None  # not all there yet
    assert transport.head_problem(b"GET / HTTP/1.1" + eol + b"X: " + b"y" * 20_000) == "request head over 16,384 bytes"
