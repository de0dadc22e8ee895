"""The inference service, run as users run it (python -m stages.serve), over real HTTP."""
from __future__ import annotations

import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import contract, evaluate, runtime, serve
from tests.conftest import REPO
from tests.helpers import SpawnedServer

NAME = "mnist"
INFER = f"/v2/models/{NAME}/infer"


def call(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, dict, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body, headers or {})
        r = conn.getresponse()
        raw = r.read()
        payload = json.loads(raw) if r.getheader("Content-Type", "").startswith("application/json") else {"raw": raw}
        return r.status, payload, dict(r.getheaders())
    finally:
        conn.close()


def infer_body(x: np.ndarray, **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}], **extra}).encode()


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(served_model):
    with SpawnedServer(served_model, "--name", NAME, "--max-batch", "64", "--max-body-bytes", "2000000") as s:
        yield s


def alive(url: str) -> bool:
    return call(url, "GET", "/v2/health/live")[0] == 200


def test_health_metadata_and_the_page(server, served_model):
    assert call(server.url, "GET", "/v2/health/live")[:2] == (200, {"live": True})
    assert call(server.url, "GET", "/v2/health/ready")[:2] == (200, {"ready": True})
    status, meta, _ = call(server.url, "GET", f"/v2/models/{NAME}")
    sha256 = runtime.sha256(served_model)
    assert status == 200 and meta["versions"] == [sha256[:12]]
    assert meta["parameters"] == {**contract.INPUT_CONTRACT, "sha256": sha256}  # what the file says, and its hash
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert call(server.url, "GET", f"/v2/models/{NAME}/versions/{meta['versions'][0]}")[0] == 200
    assert call(server.url, "GET", f"/v2/models/{NAME}/ready")[:2] == (200, {"name": NAME, "ready": True})
    status, page, headers = call(server.url, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<canvas" in page["raw"]


def test_the_server_process_never_loads_torch(server):
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "onnxruntime" in maps and "libtorch" not in maps
    code = "import sys, stages.serve, stages.predict, benchmarks.load; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_accuracy_through_the_service_equals_direct_onnxruntime_on_all_test_images(server, served_model, test_split):
    images, labels = test_split
    x = contract.to_input(images)
    logits = []
    for start in range(0, len(x), 64):
        status, r, _ = call(server.url, "POST", INFER, infer_body(x[start:start + 64], id=str(start)))
        assert status == 200 and r["id"] == str(start), r
        out = r["outputs"][0]
        logits.append(np.array(out["data"], np.float32).reshape(out["shape"]))
    served = np.concatenate(logits)
    direct = evaluate.predict_logits(runtime.open_session(runtime.load_checked(served_model)), images, 1000)
    assert served.shape == (10000, 10)
    assert evaluate.accuracy_report(labels, served)["accuracy"] == evaluate.accuracy_report(labels, direct)["accuracy"]
    assert np.abs(served - direct).max() < 1e-4


def test_binary_tensor_extension_round_trip_matches_json(server, test_split):
    from benchmarks.load import infer_bodies, read_logits
    x = contract.to_input(test_split[0][:5])
    status, r, _ = call(server.url, "POST", INFER, infer_body(x))
    as_json = np.array(r["outputs"][0]["data"], np.float32).reshape(5, 10)
    raw = x.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [5, 1, 28, 28],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", INFER, header + raw, {"Inference-Header-Content-Length": str(len(header))})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    assert response.status == 200 and response.getheader("Content-Type") == "application/octet-stream"
    np.testing.assert_array_equal(read_logits(payload, response.getheader("Inference-Header-Content-Length")),
                                  as_json)
    assert len(infer_bodies(None, 4, 2, binary=True)) == 2  # the load script's binary requests


def test_digit_endpoint_reads_a_picture(server, test_split):
    images, labels = test_split
    status, r, _ = call(server.url, "POST", "/digit", png(255 - images[0]), {"Content-Type": "image/png"})
    assert status == 200 and r["digit"] == labels[0] == int(np.argmax(r["probabilities"]))
    assert abs(sum(r["probabilities"]) - 1) < 1e-4 and r["model_version"] and r["model_name"] == NAME


def _raw(url: str, request: bytes, read_timeout: float = 5) -> bytes:
    """Send raw bytes and return what comes back before the server closes (or the timeout)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(request)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def _one(x=None, **extra) -> bytes:
    return infer_body(np.zeros((1, 1, 28, 28), np.float32) if x is None else x, **extra)


MALFORMED = {  # name: (method, path, body, headers, status)
    "invalid JSON": ("POST", INFER, b'{"inputs": [', {}, 400),
    "wrong datatype": ("POST", INFER, _one().replace(b'"FP32"', b'"INT64"'), {}, 400),
    "wrong rank": ("POST", INFER, infer_body(np.zeros((1, 28, 28), np.float32)), {}, 400),
    "wrong dims": ("POST", INFER, infer_body(np.zeros((1, 1, 28, 27), np.float32)), {}, 400),
    "shape does not match data length": ("POST", INFER, _one().replace(b"[1, 1, 28, 28]", b"[2, 1, 28, 28]"), {}, 400),
    "NaN": ("POST", INFER, _one().replace(b"0.0,", b"NaN,", 1), {}, 400),
    "infinity": ("POST", INFER, _one().replace(b"0.0,", b"Infinity,", 1), {}, 400),
    "batch over the limit": ("POST", INFER, infer_body(np.zeros((65, 1, 28, 28), np.float32)), {}, 413),
    "empty body": ("POST", INFER, b"", {}, 400),
    "binary header length not a number": ("POST", INFER, _one(), {"Inference-Header-Content-Length": "ten"}, 400),
    "binary header length beyond the body": ("POST", INFER, _one(), {"Inference-Header-Content-Length": "99999"}, 400),
    "unknown model": ("POST", "/v2/models/resnet/infer", _one(), {}, 404),
    "unknown version": ("POST", f"/v2/models/{NAME}/versions/999/infer", _one(), {}, 404),
    "undecodable image": ("POST", "/digit", b"\x89PNG\r\n\x1a\n broken", {"Content-Type": "image/png"}, 400),
    "not an image at all": ("POST", "/digit", b"hello", {}, 400),
    "blank image": ("POST", "/digit", png(np.full((60, 60), 255, np.uint8)), {}, 422),
    "unknown endpoint": ("GET", "/v1/models", None, {}, 404),
    "GET on infer": ("GET", INFER, None, {}, 405),
    "metadata of unknown model": ("GET", "/v2/models/resnet", None, {}, 404),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_each_malformed_request_gets_a_4xx_and_the_server_stays_up(server, case):
    method, path, body, headers, expected = MALFORMED[case]
    status, payload, _ = call(server.url, method, path, body, headers)
    assert status == expected, payload
    assert payload["error"]  # a message that says what is wrong
    assert alive(server.url) and server.proc.poll() is None


def test_body_over_the_limit_is_refused_before_it_is_read(server):
    # Announce 50 MB but send almost nothing: an answer that arrives anyway was given unread.
    t0 = time.perf_counter()
    answer = _raw(server.url, f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n{{".encode())
    assert answer.startswith(b"HTTP/1.1 413") and b"over the limit" in answer
    assert time.perf_counter() - t0 < 4  # answered, not left waiting for 50 MB
    assert alive(server.url)


@pytest.mark.parametrize("request_head, status", [
    (f"POST {INFER} HTTP/1.1\r\nHost: x\r\n\r\n", b"411"),
    (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"411"),
    (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", b"400"),
    ("GARBAGE\r\n\r\n", b"400"),
    ("BREW /v2 HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
    ("GET /v2 HTTP/1.1\r\n" + "X-Pad: y\r\n" * 200 + "\r\n", b"431"),
])
def test_broken_http_gets_a_4xx(server, request_head, status):
    answer = _raw(server.url, request_head.encode())
    assert answer.split(b" ")[1] == status, answer[:200]
    assert alive(server.url)


def test_readiness_turns_true_only_after_the_warm_up_run(served_model):
    svc = serve.Service(served_model, NAME, serve.ServeConfig(port=0))
    httpd = serve.Server(svc)
    url = "http://{}:{}".format(*httpd.server_address[:2])
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        assert call(url, "GET", "/v2/health/live")[0] == 200
        assert call(url, "GET", "/v2/health/ready")[:2] == (503, {"ready": False})
        status, r, headers = call(url, "POST", INFER, _one())
        assert status == 503 and "warming up" in r["error"] and headers["Retry-After"] == "1"
        svc.load()  # session + warm-up run
        assert svc.batcher.runs == 1  # the warm-up ran before readiness
        assert call(url, "GET", "/v2/health/ready")[:2] == (200, {"ready": True})
        assert call(url, "POST", INFER, _one())[0] == 200
    finally:
        httpd.drain(1)
        svc.batcher.close()


def test_overload_beyond_max_concurrency_gets_fast_503s(served_model):
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    body = _one()
    with SpawnedServer(served_model, "--name", NAME, "--max-concurrency", "1") as s:
        host, port = s.url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)), timeout=10)
        slow.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])  # holds the one slot
        time.sleep(0.5)
        t0 = time.perf_counter()
        status, r, headers = call(s.url, "POST", INFER, body, timeout=5)
        assert status == 503 and "over capacity" in r["error"] and headers["Retry-After"] == "1"
        assert time.perf_counter() - t0 < 2
        slow.sendall(body[100:])
        assert slow.recv(65536).startswith(b"HTTP/1.1 200")
        slow.close()
        assert call(s.url, "POST", INFER, body)[0] == 200  # the slot is free again


def test_graceful_shutdown_finishes_the_request_in_flight(served_model):
    body = _one()
    with SpawnedServer(served_model, "--name", NAME) as s:
        host, port = s.url.removeprefix("http://").split(":")
        idle = http.client.HTTPConnection(host, int(port), timeout=10)  # a keep-alive client between requests
        idle.request("GET", "/v2/health/live")
        idle.getresponse().read()
        busy = socket.create_connection((host, int(port)), timeout=10)
        busy.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:50])
        time.sleep(0.5)  # the request is being read: it is in flight
        t0 = time.perf_counter()
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):  # no new connections once shutdown began
            socket.create_connection((host, int(port)), timeout=2)
        busy.sendall(body[50:])
        answer = busy.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer
        assert s.wait(timeout=10) == 0  # the idle keep-alive connection did not hold it up
        assert time.perf_counter() - t0 < 8
        assert any("stopped" in line for line in s.log)


def test_batcher_joins_queued_requests_splits_results_and_closes_cleanly():
    calls = []
    gate = threading.Event()

    def run(x):
        calls.append(len(x))
        gate.wait(5)  # hold the first run so the next requests queue up behind it
        return x.reshape(len(x), -1)[:, :1] * 2

    b = serve.Batcher(run, max_batch=5)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, b(np.full((2, 3), i, np.float32))))
               for i in range(4)]
    threads[0].start()
    time.sleep(0.2)
    for t in threads[1:]:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(10)
    b.close()  # returns: the stop marker is never mistaken for "nothing carried over"
    assert calls[0] == 2 and sum(calls) == 8 and max(calls) <= 5 and len(calls) < 4  # joined, never over 5
    for i in range(4):
        np.testing.assert_array_equal(results[i], np.full((2, 1), 2 * i, np.float32))


def test_batcher_closes_while_it_waits_to_fill_a_batch():
    b = serve.Batcher(lambda x: x, max_batch=5, delay_s=0.5)
    result = {}
    caller = threading.Thread(target=lambda: result.setdefault("y", b(np.ones((1, 2), np.float32))))
    caller.start()
    time.sleep(0.1)  # the batcher now waits for more requests; close() arrives during that wait
    closer = threading.Thread(target=b.close)
    closer.start()
    closer.join(5)
    caller.join(5)
    assert not closer.is_alive(), "close() hung"
    np.testing.assert_array_equal(result["y"], np.ones((1, 2), np.float32))
