"""The static site that runs the model in the browser: the page, the model, onnxruntime-web.

    <site>/index.html, app.js, digits.js      the page, as our service serves it (serving/static)
    <site>/model.onnx                         the model it runs: FP32 or INT8 (web.model)
    <site>/ort/ort.wasm.bundle.min.mjs        onnxruntime-web's JavaScript module, its WebAssembly loader inside
    <site>/ort/ort-wasm-simd-threaded.wasm    the one WebAssembly build that module loads
    <site>/site.json                          what the page loads, and what it is (the model's SHA-256)

Nothing in it is made per request, so any static web host serves it as it is.

onnxruntime-web comes from the npm registry by name and version: the registry's document for
that version (``GET {registry}/{package}/{version}``) names the tarball and its integrity, and
the tarball is kept only if its SHA-512 is the integrity pinned in ``web.integrity`` (what a
package-lock.json records), checked before it is unpacked. ``$ONNXRUNTIME_WEB_MIRROR`` (a folder
or URL holding ``{package}-{version}.tgz``) is tried first, for offline machines and CI, as
``$MNIST_MIRROR`` is for the download stage; a source that fails falls through to the next.
Only the files the page loads are unpacked, by tarfile's "data" filter (no absolute paths, no
``..``, no links or devices).

Which files, and why: the ``wasm`` build is onnxruntime's CPU kernels compiled to WebAssembly,
which every current browser runs; WebGPU and WebNN would need a GPU or an NPU the page can't
count on. Its ``bundle`` module carries the loader of the WebAssembly inside, so the site needs
one JavaScript file and one .wasm instead of three files. The page runs it on one thread: more
need SharedArrayBuffer, which browsers give only to pages served with cross-origin isolation
headers (COOP and COEP), and a plain static host does not send them.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pipeline import atomic
from pipeline.data import DownloadError, fetch_url
from pipeline.errors import PipelineError
from pipeline.params import require

MIRROR_ENV = "ONNXRUNTIME_WEB_MIRROR"
MAX_TARBALL_BYTES = 256 << 20  # onnxruntime-web 1.30.0 is 33 MB; refuse anything absurd
MAX_DOCUMENT_BYTES = 4 << 20  # the registry's document for one version is a few kB
# In the site: the module the page imports, and the build it loads (found beside it, by its own name).
MODULE, WASM = "ort/ort.wasm.bundle.min.mjs", "ort/ort-wasm-simd-threaded.wasm"
RUNTIME_FILES = {f"package/dist/{Path(f).name}": f for f in (MODULE, WASM)}  # in the package -> in the site
MODEL_FILE, MANIFEST = "model.onnx", "site.json"
_INTEGRITY = re.compile(r"sha512-[A-Za-z0-9+/]{86}==")  # base64 of the 64 bytes of a SHA-512


@dataclass(frozen=True)
class WebConfig:
    model: Literal["fp32", "int8"] = "fp32"  # the model the page runs
    package: str = "onnxruntime-web"
    version: str = "1.30.0"
    # the registry's dist.integrity for that version: the tarball is refused unless its SHA-512 is this
    integrity: str = "sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ=="
    registry: str = "https://registry.npmjs.org/"
    timeout_s: float = 300.0  # per download, the whole file

    def __post_init__(self) -> None:
        require(re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.package) is not None, "web.package", self.package,
                "an unscoped npm package name")
        require(re.fullmatch(r"\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?", self.version) is not None, "web.version",
                self.version, "an exact version, as 1.30.0 (no ranges: the integrity pins one tarball)")
        require(_INTEGRITY.fullmatch(self.integrity) is not None, "web.integrity", self.integrity,
                "the registry's sha512-... integrity of that version (npm view PACKAGE@VERSION dist.integrity)")
        require(urllib.parse.urlparse(self.registry).scheme in ("http", "https"), "web.registry", self.registry,
                "an http(s) URL")
        require(self.timeout_s > 0, "web.timeout_s", self.timeout_s, "a number of seconds > 0")

    @property
    def tarball(self) -> str:
        """The tarball's file name, as the registry and ``npm pack`` name it."""
        return f"{self.package}-{self.version}.tgz"


@dataclass(frozen=True)
class ModelEntry:
    file: str
    name: str  # registered name, as our service reports it
    sha256: str  # the page shows its first 12 digits as the version, as our service does
    precision: Literal["fp32", "int8"]
    bytes: int


@dataclass(frozen=True)
class RuntimeEntry:
    package: str
    version: str
    integrity: str
    module: str  # what the page imports
    wasm: str  # what that module loads


@dataclass(frozen=True)
class Manifest:
    """site.json: what the page loads, and what it is."""
    model: ModelEntry
    runtime: RuntimeEntry


class IntegrityError(PipelineError, ValueError):
    """A tarball whose SHA-512 is not the registry's integrity for it: refused before it is unpacked."""


class WebError(PipelineError, RuntimeError):
    """No source gave a good runtime tarball, or it lacks a file the page needs."""


# ---------------------------------------------------------------------------- fetching, verified


def integrity(blob: bytes) -> str:
    """The Subresource Integrity string of ``blob``, as npm writes it: sha512-<base64 of the digest>."""
    return "sha512-" + base64.b64encode(hashlib.sha512(blob).digest()).decode()


def check_integrity(blob: bytes, expected: str, source: str) -> None:
    """Refuse ``blob`` (from ``source``, named in the error) unless its integrity is ``expected``."""
    got = integrity(blob)
    if got != expected:
        raise IntegrityError(f"{source}: refused before unpacking: its SHA-512 is {got}, "
                             f"but the registry's integrity for it is {expected} (a damaged or altered file)")


def sources(cfg: WebConfig, env: dict | None = None) -> tuple[str, ...]:
    """Where to look, in order: $ONNXRUNTIME_WEB_MIRROR when it is set, then the registry."""
    mirror = (os.environ if env is None else env).get(MIRROR_ENV, "").strip()
    return (mirror, cfg.registry) if mirror else (cfg.registry,)


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file")


def _from_mirror(mirror: str, cfg: WebConfig) -> tuple[bytes, str]:
    """The tarball in a mirror folder or at a mirror URL, and where it was."""
    if _is_url(mirror):
        url = urllib.parse.urljoin(mirror if mirror.endswith("/") else mirror + "/", cfg.tarball)
        return fetch_url(url, cfg.timeout_s, MAX_TARBALL_BYTES), url
    path = Path(mirror).expanduser() / cfg.tarball
    try:
        if path.stat().st_size > MAX_TARBALL_BYTES:
            raise WebError(f"{path}: refused: larger than {MAX_TARBALL_BYTES:,} bytes")
        return path.read_bytes(), str(path)
    except OSError as e:
        raise WebError(f"{path}: {e.strerror}") from None


def _from_registry(registry: str, cfg: WebConfig) -> tuple[bytes, str]:
    """The tarball the registry's document for ``cfg.version`` names, once it lists our integrity."""
    base = registry if registry.endswith("/") else registry + "/"
    document_url = urllib.parse.urljoin(base, f"{cfg.package}/{cfg.version}")
    try:
        dist = json.loads(fetch_url(document_url, cfg.timeout_s, MAX_DOCUMENT_BYTES))["dist"]
        tarball, listed = dist["tarball"], dist.get("integrity")
    except (ValueError, KeyError, TypeError) as e:
        raise WebError(f"{document_url}: not the registry's document of a version ({type(e).__name__}: {e})") from None
    if listed != cfg.integrity:
        raise IntegrityError(f"{document_url}: the registry lists the integrity {listed} for "
                             f"{cfg.package}@{cfg.version}, not web.integrity's {cfg.integrity}; once you trust "
                             "the registry's, put it in params.yaml")
    if urllib.parse.urlparse(tarball).scheme not in ("http", "https"):
        raise WebError(f"{document_url}: its tarball URL {tarball!r} is not http(s)")
    return fetch_url(tarball, cfg.timeout_s, MAX_TARBALL_BYTES), tarball


def fetch_runtime(cfg: WebConfig, where: tuple[str, ...],
                  log: Callable[[str], None] = lambda line: None) -> tuple[bytes, str]:
    """The verified runtime tarball from the first source in ``where`` that gives it, and where it came from.

    A registry (``cfg.registry``) is asked for its document of the version; any other source is a
    mirror holding the tarball. Whatever the source, the bytes are checked against ``cfg.integrity``
    before anything reads them as a tarball. When every source fails, the error lists each and why.
    """
    failures = []
    for source in where:
        try:
            blob, origin = (_from_registry if source == cfg.registry else _from_mirror)(source, cfg)
            check_integrity(blob, cfg.integrity, origin)
            return blob, origin
        except (IntegrityError, WebError, DownloadError) as e:
            failures.append(f"  {e}")
            log(f"web: {e}; trying the next source" if source != where[-1] else f"web: {e}")
    raise WebError(f"could not get a verified {cfg.tarball} from any source:\n" + "\n".join(failures)
                   + f"\nCheck the network, or set {MIRROR_ENV} to a folder or URL holding {cfg.tarball}.")


# ---------------------------------------------------------------------------- the site


def unpack_runtime(tarball: bytes, dest: Path) -> list[Path]:
    """The files the page loads (RUNTIME_FILES), from a verified tarball into the site folder ``dest``."""
    unpacked = dest / ".package"
    found: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r|gz") as tar:  # one pass over the stream
        for member in tar:
            if member.name in RUNTIME_FILES:
                try:
                    tar.extract(member, unpacked, filter="data")
                except tarfile.FilterError as e:  # an absolute path, a .. or a link out of the folder, a device
                    raise WebError(f"the runtime tarball: refused to unpack {member.name}: {e}") from None
                found.add(member.name)
    missing = sorted(set(RUNTIME_FILES) - found)
    if missing:
        raise WebError(f"the runtime tarball has no {', '.join(missing)}: this page loads onnxruntime-web's "
                       "WebAssembly bundle (dist/ort.wasm.bundle.min.mjs, 1.20 or later)")
    written = []
    for inside, target in RUNTIME_FILES.items():
        (dest / target).parent.mkdir(parents=True, exist_ok=True)
        (unpacked / inside).rename(dest / target)
        written.append(dest / target)
    shutil.rmtree(unpacked)
    return written


def write_site(dest: str | os.PathLike, page: str | os.PathLike, model: str | os.PathLike, tarball: bytes,
               manifest: Manifest) -> list[Path]:
    """(Re)create ``dest``: the page's files, the model, the runtime's files and site.json; returns
    the files written. The site appears whole, or not at all."""
    dest = Path(dest)
    staging = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for f in sorted(Path(page).iterdir()):
            if f.is_file():
                shutil.copyfile(f, staging / f.name)
        shutil.copyfile(model, staging / manifest.model.file)
        unpack_runtime(tarball, staging)
        atomic.write_text(staging / MANIFEST, json.dumps(asdict(manifest), indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return sorted(p for p in dest.rglob("*") if p.is_file())


def manifest(cfg: WebConfig, name: str, model: str | os.PathLike, sha256: str) -> Manifest:
    """What site.json says about the model (its registered name and SHA-256) and the runtime."""
    return Manifest(
        model=ModelEntry(MODEL_FILE, name, sha256, cfg.model, os.path.getsize(model)),
        runtime=RuntimeEntry(cfg.package, cfg.version, cfg.integrity, MODULE, WASM))
