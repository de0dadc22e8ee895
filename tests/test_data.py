"""IDX parsing and the verified download, against a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import gzip
import http.server
import socket
import struct
import threading
import time

import numpy as np
import pytest

from pipeline import data

TEST_LABELS = "t10k-labels-idx1-ubyte"


def idx(dims: list[int], payload: bytes | None = None, dtype: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, dtype, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    return header + (payload if payload is not None else bytes(int(np.prod(dims))))


def test_parse_good_idx():
    arr = data.parse_idx(idx([2, 3], bytes(range(6))))
    assert arr.shape == (2, 3) and arr.dtype == np.uint8 and arr[1, 2] == 5


@pytest.mark.parametrize("blob,message", [
    (b"\x00\x00", "too short for an IDX header"),
    (b"\x12\x34\x08\x01" + bytes(8), "bad magic number 0x12340801"),
    (idx([4], dtype=0x0D), "unsupported IDX data type 0x0d"),
    (struct.pack(">HBB", 0, 8, 0), "0 dimensions in the header"),
    (struct.pack(">HBB", 0, 8, 3) + bytes(4), "truncated header (8 bytes, need 16 for 3 dimensions)"),
    (idx([10, 28, 28])[:-1], "truncated: 7855 bytes, header [10, 28, 28] needs exactly 7856"),
    (idx([3]) + b"\x00", "has trailing bytes"),
])
def test_malformed_idx_gives_a_clear_error(blob, message):
    with pytest.raises(data.IDXError) as e:
        data.parse_idx(blob, "f.idx")
    assert message in str(e.value) and str(e.value).startswith("f.idx: ")


def test_load_split_real_mnist(raw_dir):
    x, y = data.load_split(raw_dir, "train")
    assert x.shape == (60000, 28, 28) and y.shape == (60000,)
    assert np.bincount(y).tolist()[:2] == [5923, 6742]  # the published class counts
    xt, yt = data.load_split(raw_dir, "test")
    assert xt.shape == (10000, 28, 28) and yt.max() == 9


def test_load_split_rejects_mismatched_files(tmp_path, raw_dir):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx([5, 28, 28]))
    (tmp_path / TEST_LABELS).write_bytes(idx([4]))
    with pytest.raises(data.IDXError, match="5 images but 4 labels"):
        data.load_split(tmp_path, "test", verify=False)  # hand-made files: not the published bytes
    (tmp_path / TEST_LABELS).write_bytes(idx([5], bytes([1, 2, 3, 4, 12])))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx([5, 28, 28]))
    with pytest.raises(data.IDXError, match="label 12 is not a digit"):
        data.load_split(tmp_path, "test", verify=False)
    with pytest.raises(data.IDXError, match="missing: run the download stage first"):
        data.load_split(tmp_path, "train")


def test_a_damaged_file_is_refused_naming_it_and_both_hashes(tmp_path, raw_dir):
    """One label changed (7 -> 1): still a well-formed IDX file of digits, so only the hash can tell."""
    import hashlib
    import shutil
    for name in data.SPLITS["test"]:
        shutil.copy(raw_dir / name, tmp_path / name)
    labels = bytearray((tmp_path / TEST_LABELS).read_bytes())
    labels[8] = 1 if labels[8] != 1 else 2  # the first label, just past the 8-byte header
    (tmp_path / TEST_LABELS).write_bytes(bytes(labels))
    with pytest.raises(data.DamagedFileError) as e:
        data.load_split(tmp_path, "test")
    message = str(e.value)
    assert str(tmp_path / TEST_LABELS) in message and "\n" not in message
    assert hashlib.sha256(labels).hexdigest() in message and data.FILES[TEST_LABELS] in message
    assert isinstance(e.value, data.PipelineError)  # the stages print it as one line


def test_mirror_override_goes_first():
    assert data.mirrors_with_override(("a", "b"), {"MNIST_MIRROR": "b"}) == ("b", "a")
    assert data.mirrors_with_override(("a",), {"MNIST_MIRROR": " /x "}) == ("/x", "a")
    assert data.mirrors_with_override(("a",), {}) == ("a",)


# ---------------------------------------------------------------- a local HTTP mirror


@pytest.fixture(scope="module")
def server(mirror, tmp_path_factory):
    """Serves /good/ (the real files), /corrupt/ (a valid gzip of altered bytes),
    /truncated/ (cut gzip), /garbage/ (not gzip), /missing/ (404), /error/ (500),
    /stall/ (sends headers, then nothing) and /short/ (Content-Length larger than the body)."""
    root = tmp_path_factory.mktemp("www")
    names = list(data.FILES)
    for folder in ("good", "corrupt", "truncated", "garbage"):
        (root / folder).mkdir()
    for name in names:
        blob = (mirror / f"{name}.gz").read_bytes()
        (root / "good" / f"{name}.gz").write_bytes(blob)
        payload = bytearray(gzip.decompress(blob))
        payload[-1] ^= 0xFF  # one flipped pixel or label
        (root / "corrupt" / f"{name}.gz").write_bytes(gzip.compress(bytes(payload), compresslevel=1))
        (root / "truncated" / f"{name}.gz").write_bytes(blob[: len(blob) // 2])
        (root / "garbage" / f"{name}.gz").write_bytes(b"<html>not found</html>")
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

        def do_GET(self):
            hits.append(self.path)
            if self.path.startswith("/error/"):
                self.send_error(500, "boom")
            elif self.path.startswith("/stall/"):
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"\x1f")
                self.wfile.flush()
                time.sleep(3)
            elif self.path.startswith("/drip/"):  # headers, then a byte every 0.3 s for up to 20 s
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(66):
                    try:
                        self.wfile.write(b"\x1f")
                        self.wfile.flush()
                    except OSError:  # the client gave up: what we want
                        return
                    time.sleep(0.3)
            elif self.path.startswith("/short/"):
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"\x1f\x8b" + bytes(10))
            else:
                super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()


FAST = data.DownloadConfig(timeout_s=1.0, retries=1, backoff_s=0.01)


@pytest.mark.integration
def test_download_falls_through_bad_mirrors_to_a_good_one(server, tmp_path):
    url, _ = server
    bad = [f"{url}/{k}/" for k in ("missing", "corrupt", "truncated", "garbage", "error")]
    sources = data.download(tmp_path, tuple(bad + [f"{url}/good/"]), FAST)
    assert set(sources.values()) == {f"{url}/good/"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(data.FILES)
    assert all(data.file_ok(tmp_path / n, n) for n in data.FILES)


@pytest.mark.integration
def test_download_is_idempotent(server, tmp_path):
    url, hits = server
    data.download(tmp_path, (f"{url}/good/",), FAST)
    before = len(hits)
    assert set(data.download(tmp_path, (f"{url}/good/",), FAST).values()) == {"already present"}
    assert len(hits) == before


@pytest.mark.integration
def test_all_mirrors_failing_names_each_and_leaves_no_file(server, tmp_path):
    url, _ = server
    mirrors = (f"{url}/missing/", f"{url}/corrupt/", f"{url}/truncated/", f"{url}/garbage/",
               f"{url}/error/", str(tmp_path / "nowhere"))
    with pytest.raises(data.DownloadError) as e:
        data.download(tmp_path / "out", mirrors, FAST)
    msg = str(e.value)
    assert "could not get a verified copy of train-images-idx3-ubyte" in msg
    assert f"{url}/missing/: HTTP 404" in msg
    assert f"{url}/corrupt/: checksum mismatch" in msg
    assert f"{url}/truncated/: truncated gzip file" in msg
    assert f"{url}/garbage/: not a valid gzip file" in msg
    assert f"{url}/error/: HTTP 500 boom (after 2 tries)" in msg
    assert "No such file or directory" in msg
    assert "set MNIST_MIRROR" in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.integration
def test_stalled_and_short_servers_are_abandoned_within_the_timeout(server, tmp_path):
    url, _ = server
    t0 = time.monotonic()
    with pytest.raises(data.DownloadError) as e:
        data.fetch_verified(TEST_LABELS, (f"{url}/stall/", f"{url}/short/"),
                            data.DownloadConfig(timeout_s=0.5, retries=0))
    assert time.monotonic() - t0 < 2.5
    assert f"{url}/stall/: too slow: not complete within 0.5 s" in str(e.value)
    assert f"{url}/short/: " in str(e.value)


@pytest.mark.integration
def test_a_good_file_is_never_replaced_by_a_bad_download(server, tmp_path):
    url, _ = server
    data.download(tmp_path, (f"{url}/good/",), FAST)
    (tmp_path / TEST_LABELS).write_bytes(b"junk")  # a damaged file is fetched again
    data.download(tmp_path, (f"{url}/corrupt/", f"{url}/good/"), FAST)
    assert data.file_ok(tmp_path / TEST_LABELS, TEST_LABELS)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.fixture
def silent_server():
    """Accepts connections and never answers: a mirror that hangs."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.integration
def test_a_dripping_server_is_abandoned_at_the_deadline(server):
    """A byte every 0.3 s never trips a per-read socket timeout of 1 s: only a deadline for the
    whole file stops it (before: the download waited until the server hung up, 20 s here)."""
    url, _ = server
    t0 = time.monotonic()
    with pytest.raises(data.DownloadError, match="too slow: not complete within 1 s"):
        data.fetch_verified(TEST_LABELS, (f"{url}/drip/",), data.DownloadConfig(timeout_s=1.0, retries=0))
    # the 1 s deadline, plus slack for a busy machine; without it the call lasted the server's 20 s
    assert time.monotonic() - t0 < 4.0


@pytest.mark.integration
def test_a_dead_mirror_is_skipped_for_the_rest_of_the_run_and_said_so(silent_server, mirror, tmp_path):
    """A mirror that never answers costs its tries once, not once per file, and the user is
    told whom we wait on and what was skipped (before: 4 files x 2 tries x 1 s, in silence)."""
    cfg = data.DownloadConfig(timeout_s=1.0, retries=1, backoff_s=0.1)
    lines: list[str] = []
    t0 = time.monotonic()
    sources = data.download(tmp_path, (silent_server, str(mirror)), cfg, log=lines.append)
    elapsed = time.monotonic() - t0
    assert set(sources.values()) == {str(mirror)}
    # (retries + 1) x timeout_s, plus the backoff and the local copies (about 1 s here; 3 s allowed
    # for a busy machine); per file, as before, it would be 4 x 2 x 1 s = 8 s at least
    assert elapsed < (cfg.retries + 1) * cfg.timeout_s + 3.0, elapsed
    first = sorted(data.FILES, key=list(data.FILES).index)[0]
    assert f"{first}.gz: waiting on {silent_server} (try 1 of 2, at most 1 s)" in lines
    assert sum(f"waiting on {silent_server}" in line for line in lines) == cfg.retries + 1
    assert any(line.startswith(f"skipping {silent_server} for the rest of this run: ") for line in lines)


@pytest.mark.integration
def test_every_mirror_dead_names_the_skipped_ones(silent_server):
    cfg = data.DownloadConfig(timeout_s=0.5, retries=0)
    unreachable: dict[str, str] = {}
    first, second = list(data.FILES)[:2]
    with pytest.raises(data.DownloadError, match="timed out"):
        data.fetch_verified(first, (silent_server,), cfg, unreachable=unreachable)
    t0 = time.monotonic()
    with pytest.raises(data.DownloadError, match="skipped, unreachable earlier in this run .*timed out"):
        data.fetch_verified(second, (silent_server,), cfg, unreachable=unreachable)
    assert time.monotonic() - t0 < 0.2  # not waited on again
