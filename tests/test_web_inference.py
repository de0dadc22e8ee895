"""benchmarks/web_inference.py measures what it says: the page's own inference time beside onnxruntime's."""
from __future__ import annotations

import pytest

from benchmarks import web_inference
from harness.services import StaticServer

pytestmark = pytest.mark.integration


def test_both_runtimes_are_timed_on_the_same_model_in_alternating_rounds(web_site, served_model, raw_dir, browser,
                                                                        tmp_path):
    blobs = web_inference.pictures(raw_dir, 3)
    manifest = (web_site / "site.json").read_text()
    int8 = tmp_path / "model.int8.onnx"
    int8.write_bytes(served_model.read_bytes())
    site = web_inference.site_serving(web_site, int8, tmp_path)
    assert (site / "model.onnx").read_bytes() == served_model.read_bytes()
    assert '"precision": "int8"' in (site / "site.json").read_text()
    assert (web_site / "site.json").read_text() == manifest  # the copy's manifest is its own, not written through
    with StaticServer(site) as host:
        result = web_inference.measure(browser, host.url, int8, blobs, calls=12, rounds=3)
    assert result["calls"] == 12
    assert 0 < result["chromium_inference_ms_p50"] <= result["chromium_inference_ms_p90"]
    assert 0 < result["python_ort_1thread_ms_p50"] <= result["python_ort_1thread_ms_p90"]
    assert result["chromium_preprocessing_ms_p50"] > 0 and result["ratio_chromium_vs_python_p50"] > 0
    assert host.paths() >= {"/", "/site.json", "/model.onnx", "/ort/ort-wasm-simd-threaded.wasm"}
