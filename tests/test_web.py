"""The web stage: onnxruntime-web from a mirror or the npm registry, verified before it is unpacked; the site."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import yaml

from harness.services import REPO, StaticServer, free_port
from pipeline import web
from pipeline.params import ParamError, parse

PAGE = REPO / "serving" / "static"
RUNTIME = {"package/dist/ort.wasm.bundle.min.mjs": b"export const ort = 1;\n",
           "package/dist/ort-wasm-simd-threaded.wasm": b"\0asm\1\0\0\0",
           "package/package.json": b'{"name": "onnxruntime-web"}', "package/dist/ort.webgpu.mjs": b"// not needed\n"}


def tarball(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A gzipped npm-style tarball holding ``files`` (and symbolic ``links``: name -> target)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return out.getvalue()


def pinned(blob: bytes, **changes) -> web.WebConfig:
    return web.WebConfig(integrity=web.integrity(blob), **changes)


def test_integrity_is_the_sha512_in_base64_that_npm_lists(web_mirror):
    empty = "sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg=="
    assert web.integrity(b"") == empty
    published = (web_mirror / "README.md").read_text()
    assert web.WebConfig().integrity in published  # the default pin is the registry's, as the mirror's README lists it
    assert web.integrity((web_mirror / web.WebConfig().tarball).read_bytes()) == web.WebConfig().integrity


def test_a_tarball_with_one_byte_changed_is_refused_before_it_is_unpacked_naming_the_file_and_both_hashes(
        web_mirror, tmp_path, monkeypatch):
    cfg = web.WebConfig()
    blob = bytearray((web_mirror / cfg.tarball).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (tmp_path / cfg.tarball).write_bytes(blob)

    def unpacked(*args, **kwargs):
        raise AssertionError("a tarball that failed its integrity check was opened")
    monkeypatch.setattr(tarfile, "open", unpacked)
    with pytest.raises(web.WebError) as refused:
        web.fetch_runtime(cfg, (str(tmp_path),))
    message = str(refused.value)
    assert f"{tmp_path / cfg.tarball}: refused before unpacking" in message
    assert f"its SHA-512 is {web.integrity(bytes(blob))}" in message
    assert f"the registry's integrity for it is {cfg.integrity}" in message


def test_the_mirror_goes_first_and_a_bad_source_falls_through_to_the_next(tmp_path):
    cfg = pinned(good := tarball(RUNTIME))
    assert web.sources(cfg, {web.MIRROR_ENV: " /srv/npm "}) == ("/srv/npm", cfg.registry)
    assert web.sources(cfg, {}) == (cfg.registry,)
    for folder, blob in (("bad", b"not it"), ("good", good)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / cfg.tarball).write_bytes(blob)
    heard: list[str] = []
    got, origin = web.fetch_runtime(cfg, (str(tmp_path / "missing"), str(tmp_path / "bad"), str(tmp_path / "good")),
                                    heard.append)
    assert (got, origin) == (good, str(tmp_path / "good" / cfg.tarball))
    assert "No such file or directory; trying the next source" in heard[0]
    assert f"{tmp_path / 'bad' / cfg.tarball}: refused before unpacking" in heard[1]


@pytest.mark.parametrize("key, value", [("version", "^1.30.0"), ("version", "latest"), ("integrity", "sha1-abc="),
                                        ("integrity", "sha512-short=="), ("package", "@scope/pkg"),
                                        ("registry", "ftp://registry.example/"), ("model", "fp16")])
def test_params_that_do_not_pin_one_tarball_are_refused(key, value):
    with pytest.raises(ParamError, match=f"web.{key}"):
        parse(web.WebConfig, {key: value}, "web")


def test_only_the_files_the_page_loads_are_unpacked_and_a_link_out_is_refused(tmp_path):
    written = web.unpack_runtime(tarball(RUNTIME), tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(tmp_path).as_posix() for p in written) == sorted([web.MODULE, web.WASM])
    assert (tmp_path / web.WASM).read_bytes() == RUNTIME["package/dist/ort-wasm-simd-threaded.wasm"]

    linked = {k: v for k, v in RUNTIME.items() if not k.endswith(".wasm")}
    with pytest.raises(web.WebError, match="refused to unpack package/dist/ort-wasm-simd-threaded.wasm"):
        web.unpack_runtime(tarball(linked, {"package/dist/ort-wasm-simd-threaded.wasm": "/etc/passwd"}),
                           tmp_path / "linked")
    with pytest.raises(web.WebError, match="has no package/dist/ort-wasm-simd-threaded.wasm"):
        web.unpack_runtime(tarball(linked), tmp_path / "short")


def test_the_site_holds_the_page_the_model_the_runtime_and_what_they_are(tmp_path):
    blob, cfg = tarball(RUNTIME), web.WebConfig(model="int8")
    model = tmp_path / "model.int8.onnx"
    model.write_bytes(b"an onnx model")
    site = tmp_path / "site"
    (site / "ort").mkdir(parents=True)
    (site / "ort" / "stale.wasm").write_bytes(b"from an older build")
    files = web.write_site(site, PAGE, model, blob, web.manifest(cfg, "mnist-cnn-onnx", model, "ab" * 32))
    page = sorted(f.name for f in PAGE.iterdir() if f.is_file())
    assert [f.relative_to(site).as_posix() for f in files] == sorted([*page, web.MODEL_FILE, web.MANIFEST,
                                                                      web.MODULE, web.WASM])
    assert (site / web.MODEL_FILE).read_bytes() == b"an onnx model"
    assert json.loads((site / web.MANIFEST).read_text()) == {
        "model": {"file": "model.onnx", "name": "mnist-cnn-onnx", "sha256": "ab" * 32, "precision": "int8",
                  "bytes": 13},
        "runtime": {"package": "onnxruntime-web", "version": "1.30.0", "integrity": cfg.integrity,
                    "module": web.MODULE, "wasm": web.WASM}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx", "site"]  # no staging folder left


@pytest.mark.integration
def test_the_registry_document_names_the_tarball_and_a_differing_integrity_is_refused(tmp_path):
    good = tarball(RUNTIME)
    with StaticServer(tmp_path) as registry:  # laid out as the registry's API: /{package}/{version}, the tarball
        cfg = pinned(good, registry=registry.url + "/")
        package = tmp_path / cfg.package
        (package / "-").mkdir(parents=True)
        (package / "-" / cfg.tarball).write_bytes(good)
        tarball_url = f"{registry.url}/{cfg.package}/-/{cfg.tarball}"
        document = {"name": cfg.package, "version": cfg.version,
                    "dist": {"tarball": tarball_url, "integrity": cfg.integrity, "shasum": "ignored"}}
        (package / cfg.version).write_text(json.dumps(document))
        assert web.fetch_runtime(cfg, web.sources(cfg, {})) == (good, tarball_url)
        assert [path for _, path, _ in registry.requests] == [f"/{cfg.package}/{cfg.version}",
                                                               f"/{cfg.package}/-/{cfg.tarball}"]

        (package / "-" / cfg.tarball).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # what it serves is altered
        with pytest.raises(web.WebError, match=re.escape(f"{tarball_url}: refused before unpacking")):
            web.fetch_runtime(cfg, (cfg.registry,))
        other = web.integrity(b"another tarball")
        (package / cfg.version).write_text(json.dumps({**document, "dist": {**document["dist"], "integrity": other}}))
        with pytest.raises(web.WebError, match=re.escape(f"the registry lists the integrity {other}")) as refused:
            web.fetch_runtime(cfg, (cfg.registry,))
        assert f"not web.integrity's {cfg.integrity}" in str(refused.value)


@pytest.mark.integration
def test_the_stage_refuses_a_tampered_mirror_without_a_traceback_and_writes_nothing_then_builds_from_a_good_one(
        small_onnx, web_mirror, tmp_path):
    _, model = small_onnx
    params = {"web": {"registry": f"http://127.0.0.1:{free_port()}/"}}  # nothing listens: no internet is asked
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = web.WebConfig()
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    blob = bytearray((web_mirror / cfg.tarball).read_bytes())
    blob[1000] ^= 0x80
    (tampered / cfg.tarball).write_bytes(blob)

    def stage(mirror):
        return subprocess.run([sys.executable, "-m", "stages.web", "--fp32", str(model), "--int8", str(model),
                               "--page", str(PAGE), "--out", "site"], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO), web.MIRROR_ENV: str(mirror)}, timeout=120)
    refused = stage(tampered)
    assert refused.returncode == 1, refused.stderr
    assert "Traceback" not in refused.stderr
    first = refused.stderr.splitlines()[0]
    assert first == f"stages.web: error: could not get a verified {cfg.tarball} from any source:"
    assert f"{tampered / cfg.tarball}: refused before unpacking: its SHA-512 is {web.integrity(bytes(blob))}, " \
           f"but the registry's integrity for it is {cfg.integrity}" in refused.stderr
    assert not (tmp_path / "site").exists() and not (tmp_path / ".site.tmp").exists()

    built = stage(web_mirror)
    assert built.returncode == 0, built.stderr
    site = tmp_path / "site"
    assert (site / "model.onnx").read_bytes() == model.read_bytes()
    assert (site / web.WASM).stat().st_size > 1_000_000 and (site / "index.html").is_file()
    assert json.loads((site / web.MANIFEST).read_text())["runtime"]["integrity"] == cfg.integrity
