"""MNIST: mirrors and checksums, a verified download, IDX parsing into arrays.

Each file is fetched as ``<name>.gz`` from the first mirror that works, decompressed, and
kept only if the SHA-256 of the decompressed payload is the published one and its IDX
header is valid. A network error, a timeout, a stalled server, a corrupt gzip, a wrong
checksum or a bad header falls through to the next mirror; when every mirror fails, the
error names each one and why. Files reach their final path only whole (pipeline.atomic).
"""
from __future__ import annotations

import functools
import hashlib
import http.client
import math
import os
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import atomic, contract
from pipeline.errors import PipelineError
from pipeline.params import require

# SHA-256 of each decompressed payload (the published MNIST files; see shared/mnist/README.md).
FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MAX_GZ_BYTES = 64 << 20  # the largest file is ~10 MB compressed; refuse anything absurd
MAX_PAYLOAD_BYTES = 64 << 20  # and ~47 MB decompressed (a gzip bomb stops here)
MIRROR_ENV = "MNIST_MIRROR"


@dataclass(frozen=True)
class DownloadConfig:
    mirrors: tuple[str, ...] = (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    )
    timeout_s: float = 30.0  # per try: connecting and receiving the whole file
    retries: int = 2  # extra tries per mirror after a network error, with exponential backoff
    backoff_s: float = 1.0  # wait before the first retry; doubles each time

    def __post_init__(self) -> None:
        require(len(self.mirrors) >= 1, "download.mirrors", list(self.mirrors), "at least one mirror")
        require(self.timeout_s > 0, "download.timeout_s", self.timeout_s, "a number of seconds > 0")
        require(self.retries >= 0, "download.retries", self.retries, "a whole number >= 0")
        require(self.backoff_s >= 0, "download.backoff_s", self.backoff_s, "a number of seconds >= 0")


class DownloadError(PipelineError, RuntimeError):
    """No mirror gave a good copy of a file; the message lists every mirror and why."""


class IDXError(PipelineError, ValueError):
    """A file that is not a well-formed IDX file of the expected kind."""


class DamagedFileError(PipelineError, ValueError):
    """A data file whose SHA-256 is not the published one (damaged on a disk, a remote, a copy)."""


class _MirrorFailure(Exception):
    """One mirror failed for one file; the next mirror is tried."""


class _NetworkFailure(_MirrorFailure):
    """A failure worth retrying on the same mirror (connection, timeout, 5xx)."""


class _Unreachable(_NetworkFailure):
    """No answer in time, or no connection: after its retries the mirror is skipped for the
    rest of the run (a dead mirror costs its retries once, not once per file)."""


def mirrors_with_override(mirrors: tuple[str, ...], env: dict | None = None) -> tuple[str, ...]:
    """Put $MNIST_MIRROR (a folder or URL) first, when it is set."""
    extra = (os.environ if env is None else env).get(MIRROR_ENV, "").strip()
    return ((extra,) + tuple(m for m in mirrors if m != extra)) if extra else tuple(mirrors)


# ---------------------------------------------------------------------------- fetching


def _is_url(mirror: str) -> bool:
    return urllib.parse.urlparse(mirror).scheme in ("http", "https", "file")


def _fetch_url(url: str, timeout_s: float, progress: Callable[[int], None], max_bytes: int = MAX_GZ_BYTES) -> bytes:
    """The body at ``url``, all of it within ``timeout_s`` seconds, whatever the server does, and
    at most ``max_bytes`` of it.

    Each read takes what has arrived (``read1``) with the socket's timeout set to the time
    left, so a server that stalls, or drips a byte every few seconds, is abandoned at the
    deadline instead of when it hangs up.
    """
    deadline = time.monotonic() + timeout_s
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and not (length.isascii() and length.isdigit()):
                raise _MirrorFailure(f"invalid Content-Length {length!r}")
            if length is not None and int(length) > max_bytes:
                raise _MirrorFailure(f"refused: {length} bytes is more than the {max_bytes:,} expected at most")
            chunks, got = [], 0
            while True:
                too_slow = _Unreachable(f"too slow: not complete within {timeout_s:g} s ({got:,} bytes)")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise too_slow
                _set_read_timeout(resp, left)
                try:
                    chunk = resp.read1(1 << 16)
                except TimeoutError:
                    raise too_slow from None
                if not chunk:
                    break
                got += len(chunk)
                if got > max_bytes:
                    raise _MirrorFailure(f"refused: more than the {max_bytes:,} bytes expected at most")
                chunks.append(chunk)
                progress(len(chunk))
            data = b"".join(chunks)
            if length is not None and len(data) != int(length):
                raise _NetworkFailure(f"truncated: got {len(data)} of {length} bytes")
            return data
    except urllib.error.HTTPError as e:
        cls = _NetworkFailure if e.code >= 500 else _MirrorFailure
        raise cls(f"HTTP {e.code} {e.reason}") from None
    except (TimeoutError, ConnectionError) as e:  # no answer in time, refused, reset
        raise _Unreachable(f"{type(e).__name__}: {e or 'timed out'}") from None
    except urllib.error.URLError as e:
        cls = _Unreachable if isinstance(e.reason, (TimeoutError, ConnectionError, OSError)) else _NetworkFailure
        raise cls(f"{type(e.reason).__name__}: {e.reason}") from None
    except (http.client.HTTPException, OSError, ValueError) as e:  # ValueError: malformed URL
        raise _NetworkFailure(f"{type(e).__name__}: {e}") from None


def fetch_url(url: str, timeout_s: float, max_bytes: int) -> bytes:
    """The body at ``url`` within ``timeout_s`` seconds and ``max_bytes`` bytes, for downloads other
    than MNIST's (the web stage's runtime); a DownloadError says why not."""
    try:
        return _fetch_url(url, timeout_s, lambda n: None, max_bytes)
    except _MirrorFailure as e:
        raise DownloadError(f"{url}: {e}") from None


def _set_read_timeout(resp, seconds: float) -> None:
    """Bound the next socket read of an http.client response (file: URLs have no socket)."""
    sock = getattr(getattr(resp.fp, "raw", None), "_sock", None)  # SocketIO keeps its socket here
    if isinstance(sock, socket.socket):
        sock.settimeout(seconds)


def _fetch(mirror: str, name: str, cfg: DownloadConfig, progress: Callable[[int], None],
           log: Callable[[str], None]) -> bytes:
    """The raw .gz bytes of one file from one mirror, with retries on network errors."""
    if not _is_url(mirror):
        path = Path(mirror).expanduser() / f"{name}.gz"
        try:
            if path.stat().st_size > MAX_GZ_BYTES:
                raise _MirrorFailure(f"refused: {path} is larger than any MNIST file")
            data = path.read_bytes()
        except OSError as e:
            raise _MirrorFailure(f"{e.strerror}: {path}") from None
        progress(len(data))
        return data
    url = urllib.parse.urljoin(mirror if mirror.endswith("/") else mirror + "/", f"{name}.gz")
    for attempt in range(cfg.retries + 1):
        log(f"{name}.gz: waiting on {mirror} (try {attempt + 1} of {cfg.retries + 1}, "
            f"at most {cfg.timeout_s:g} s)")
        try:
            return _fetch_url(url, cfg.timeout_s, progress)
        except _NetworkFailure as e:
            if attempt == cfg.retries:
                raise type(e)(f"{e} (after {attempt + 1} tries)") from None
            wait = cfg.backoff_s * 2**attempt
            log(f"{name}.gz: {mirror}: {e}; trying again in {wait:g} s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def _decompress(blob: bytes) -> bytes:
    try:
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
        payload = d.decompress(blob, MAX_PAYLOAD_BYTES + 1)
    except zlib.error as e:
        raise _MirrorFailure(f"not a valid gzip file ({e})") from None
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise _MirrorFailure("refused: decompresses to more than any MNIST file")
    if not d.eof:
        raise _MirrorFailure("truncated gzip file")
    return payload


def fetch_verified(name: str, mirrors: tuple[str, ...], cfg: DownloadConfig,
                   progress: Callable[[int], None] = lambda n: None,
                   log: Callable[[str], None] = lambda line: None,
                   unreachable: dict[str, str] | None = None) -> tuple[bytes, str]:
    """The verified, decompressed payload of one file and the mirror that served it.

    ``unreachable`` ({mirror: why}) carries dead mirrors from file to file: a mirror that
    timed out or refused the connection on every try is skipped from then on.
    """
    expected = FILES[name]
    unreachable = {} if unreachable is None else unreachable
    failures = []
    for mirror in mirrors:
        if mirror in unreachable:
            failures.append(f"  {mirror}: skipped, unreachable earlier in this run ({unreachable[mirror]})")
            continue
        try:
            payload = _decompress(_fetch(mirror, name, cfg, progress, log))
            digest = hashlib.sha256(payload).hexdigest()
            if digest != expected:
                raise _MirrorFailure(f"checksum mismatch: sha256 {digest[:16]}..., expected {expected[:16]}...")
            try:
                parse_idx(payload, name)
            except IDXError as e:
                raise _MirrorFailure(str(e)) from None
            return payload, mirror
        except _MirrorFailure as e:
            failures.append(f"  {mirror}: {e}")
            if isinstance(e, _Unreachable):
                unreachable[mirror] = str(e)
                log(f"skipping {mirror} for the rest of this run: {e}")
    raise DownloadError(
        f"could not get a verified copy of {name} from any mirror:\n" + "\n".join(failures)
        + f"\nCheck the network, or set {MIRROR_ENV} to a folder or URL holding the four MNIST .gz files."
    )


def file_ok(path: Path, name: str) -> bool:
    """True if ``path`` already holds the verified payload of ``name``."""
    if not path.is_file() or path.stat().st_size > MAX_PAYLOAD_BYTES:
        return False
    return hashlib.sha256(path.read_bytes()).hexdigest() == FILES[name]


def download(dest: Path, mirrors: tuple[str, ...], cfg: DownloadConfig,
             progress: Callable[[str, int], None] = lambda name, n: None,
             log: Callable[[str], None] = lambda line: None) -> dict[str, str]:
    """Make ``dest`` hold the four verified IDX files; returns {file: mirror it came from}.

    ``log`` hears which mirror is being waited on, each retry, and each mirror skipped."""
    sources = {}
    unreachable: dict[str, str] = {}
    for name in FILES:
        path = dest / name
        if file_ok(path, name):
            sources[name] = "already present"
            continue
        payload, sources[name] = fetch_verified(name, mirrors, cfg, functools.partial(progress, name),
                                                log, unreachable)
        atomic.write_bytes(path, payload)
    return sources


# ---------------------------------------------------------------------------- IDX format

_IDX_DTYPES = {0x08: np.uint8}  # MNIST uses only unsigned bytes


def parse_idx(data: bytes, what: str = "IDX file") -> np.ndarray:
    """Parse an IDX file (http://yann.lecun.com/exdb/mnist/): magic, dims, then the payload.

    Magic: two zero bytes, a type code (0x08 = ubyte), the number of dimensions. Then one
    big-endian uint32 per dimension. The payload must have exactly prod(dims) items.
    """
    if len(data) < 4:
        raise IDXError(f"{what}: only {len(data)} bytes, too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise IDXError(f"{what}: bad magic number 0x{data[:4].hex()} (expected 0x0000 then type and rank)")
    if dtype_code not in _IDX_DTYPES:
        raise IDXError(f"{what}: unsupported IDX data type 0x{dtype_code:02x} (MNIST uses 0x08, unsigned byte)")
    if not 1 <= ndim <= 4:
        raise IDXError(f"{what}: {ndim} dimensions in the header; MNIST files have 1 (labels) or 3 (images)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{what}: truncated header ({len(data)} bytes, need {header} for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if math.prod(d for d in dims if d) > MAX_PAYLOAD_BYTES:  # even with a 0 beside them
        raise IDXError(f"{what}: header dimensions {list(dims)} are larger than any MNIST file")
    expected = header + math.prod(dims)  # Python ints: 2**32-sized dims can't overflow
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "has trailing bytes"
        raise IDXError(f"{what}: {kind}: {len(data)} bytes, header {list(dims)} needs exactly {expected}")
    return np.frombuffer(data, dtype=_IDX_DTYPES[dtype_code], offset=header).reshape(dims)


def load_split(raw_dir: Path, split: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of 'train' or 'test', validated.

    ``verify``: each file's SHA-256 must be the published one (FILES), wherever the folder came
    from (a download, ``dvc pull``, a copy): hashing the bytes already read costs ~0.04 s for the
    train split's 47 MB. Off only for hand-made IDX files (the tests of the checks below)."""
    img_name, lbl_name = SPLITS[split]
    images = _read_idx(Path(raw_dir) / img_name, verify)
    labels = _read_idx(Path(raw_dir) / lbl_name, verify)
    side = contract.SIDE
    if images.ndim != 3 or images.shape[1:] != (side, side):
        raise IDXError(f"{img_name}: shape {list(images.shape)}, expected [N, {side}, {side}] images")
    if labels.ndim != 1:
        raise IDXError(f"{lbl_name}: shape {list(labels.shape)}, expected [N] labels")
    if len(images) != len(labels):
        raise IDXError(f"{split} split: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise IDXError(f"{lbl_name}: label {int(labels.max())} is not a digit 0-9")
    return images, labels


def _read_idx(path: Path, verify: bool) -> np.ndarray:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IDXError(f"{path} is missing: run the download stage first (dvc repro download)") from None
    if verify and (digest := hashlib.sha256(data).hexdigest()) != FILES[path.name]:
        raise DamagedFileError(f"{path} is damaged: its SHA-256 is {digest}, the published file's is "
                               f"{FILES[path.name]}; fetch it again (see docs/team.md, 'A damaged file')")
    return parse_idx(data, str(path))
