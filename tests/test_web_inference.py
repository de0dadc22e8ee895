"""benchmarks/web_inference.py measures what it says: the page's own inference time beside onnxruntime's."""
from __future__ import annotations

import pytest

from benchmarks import web_inference
from tests.helpers import StaticServer

pytestmark = pytest.mark.integration


def test_both_runtimes_are_timed_on_the_same_model_in_alternating_rounds(web_site, served_model, raw_dir, browser,
                                                                        tmp_path):
    blobs = web_inference.pictures(raw_dir, 3)
    site = web_inference.site_serving(web_site, served_model, tmp_path)
    assert (site / "model.onnx").read_bytes() == served_model.read_bytes()
    with StaticServer(site) as host:
        result = web_inference.measure(browser, host.url, served_model, blobs, calls=12, rounds=3)
    assert result["calls"] == 12
    assert 0 < result["chromium_inference_ms_p50"] <= result["chromium_inference_ms_p90"]
    assert 0 < result["python_ort_1thread_ms_p50"] <= result["python_ort_1thread_ms_p90"]
    assert result["chromium_preprocessing_ms_p50"] > 0 and result["ratio_chromium_vs_python_p50"] > 0
    assert {p for _, p, _ in host.requests} >= {"/", "/model.onnx", "/ort/ort-wasm-simd-threaded.wasm"}
