"""The service's image, built from a copy of this checkout by scripts/image.sh and run with podman,
locked down as deploy/ runs it (read-only root filesystem, no capabilities, non-root), driven by
Triton's own client over 127.0.0.1.

The base image is made here from the Debian mirror apt uses (mmdebstrap; no registry is reachable),
once per session, and the image is built once per session on it; both are removed at the end.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from harness import containers
from pipeline import contract, runtime
from tests.conftest import copy_repo

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NAME = contract.RegistryConfig.model_name  # the image serves the model under this name
DIGITS = 256  # real test digits sent through the container, and through onnxruntime in-process


@pytest.fixture(scope="session")
def podman_ready():
    """Skipped with the reason where containers can't run (not root, tools missing), but never in
    CI (CI=true), where these tests must run."""
    if reason := containers.unavailable():
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def base_image(podman_ready, tmp_path_factory):
    tag = f"localhost/mnist-onnx-test-base:{uuid.uuid4().hex[:8]}"
    containers.make_base(tmp_path_factory.mktemp("base"), tag)
    yield tag
    containers.remove_image(tag)


@pytest.fixture(scope="session")
def image(base_image, served_model, tmp_path_factory):
    """The image, built by scripts/image.sh in a fresh copy of this checkout with served_model as
    its models/model.onnx."""
    checkout = copy_repo(tmp_path_factory.mktemp("checkout"))
    shutil.copy(served_model, checkout / "models" / "model.onnx")
    tag = containers.build_image(checkout, f"localhost/mnist-onnx-test:{uuid.uuid4().hex[:8]}", base_image)
    yield tag
    containers.remove_image(tag)


@pytest.fixture(scope="module")
def container(image):
    with containers.Container(image) as c:
        yield c


@pytest.fixture(scope="module")
def client(container):
    import tritonclient.http as triton
    c = triton.InferenceServerClient(container.url.removeprefix("http://"))
    yield c
    c.close()


def test_the_container_is_live_ready_and_serves_the_model_it_was_built_with(client, served_model):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    meta = client.get_model_metadata(NAME)
    assert meta["versions"] == [runtime.sha256(served_model)[:12]]  # the model's SHA-256 prefix
    assert meta["platform"] == "onnxruntime_onnx" and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_the_container_answers_as_onnxruntime_in_process_on_real_digits(client, served_model, test_split, binary):
    import tritonclient.http as triton
    images, labels = test_split[0][:DIGITS], test_split[1][:DIGITS]
    x = contract.to_input(images)
    direct = runtime.open_session(runtime.load_checked(served_model)).run(x)
    served = []
    for start in range(0, DIGITS, 64):
        tensor = triton.InferInput(contract.INPUT_NAME, [64, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(x[start:start + 64], binary_data=binary)
        result = client.infer(NAME, [tensor], outputs=[triton.InferRequestedOutput(contract.OUTPUT_NAME,
                                                                                  binary_data=binary)])
        served.append(result.as_numpy(contract.OUTPUT_NAME))
    logits = np.concatenate(served)
    assert logits.shape == (DIGITS, 10)
    np.testing.assert_array_equal(logits.argmax(1), direct.argmax(1))  # the same digit for every image
    np.testing.assert_allclose(logits, direct, atol=1e-4)  # onnxruntime may be another release in the image
    assert (logits.argmax(1) == labels).mean() > 0.9  # and they are digits: the model reads them


def test_post_digit_reads_a_picture_and_metrics_count_what_was_served(container, served_model, test_split):
    import urllib.request
    image, label = test_split[0][0], int(test_split[1][0])
    png = io.BytesIO()
    Image.fromarray(image).save(png, "PNG")
    request = urllib.request.Request(f"{container.url}/digit", png.getvalue(), {"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=30) as r:
        answer = json.loads(r.read())
    direct = runtime.open_session(runtime.load_checked(served_model)).run(contract.to_input(image[None]))
    assert answer["digit"] == int(direct.argmax()) == label
    assert answer["model_version"] == runtime.sha256(served_model)[:12]
    with urllib.request.urlopen(f"{container.url}/metrics", timeout=30) as r:
        text = r.read().decode()
    served = re.search(rf'^nv_inference_request_success_total\{{model="{NAME}",version="\w+"\}} (\S+)$', text, re.M)
    assert served and float(served[1]) >= 1  # this test's request at least (the module's others too)
    assert re.search(r'^mnist_http_requests_total\{endpoint="digit",method="POST",status="200"\} 1\.0$', text, re.M)


def test_it_runs_as_a_non_root_user_on_a_read_only_root_filesystem(container):
    assert container.exec("id", "-u").stdout.strip() == "10001"
    status = container.exec("cat", "/proc/1/status").stdout
    assert re.search(r"^Uid:\s+10001\s+10001\s+10001\s+10001$", status, re.M), status  # the service itself
    assert container.exec("cat", "/proc/1/cmdline").stdout.split("\0")[:3] == ["python", "-m", "serving"]
    mounts = container.exec("cat", "/proc/mounts").stdout
    assert re.search(r"^\S+ / \S+ ro[,\s]", mounts, re.M), mounts
    assert not re.search(r"^\S+ /tmp ", mounts, re.M)  # no writable /tmp either, as Kubernetes gives none
    for path in ("/probe", "/tmp/probe", "/app/probe", "/models/probe"):
        denied = container.exec("touch", path, user="0")  # not even root may write
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, (path, denied.stderr)
    assert "CapEff:\t0000000000000000" in status  # no capabilities
    assert "NoNewPrivs:\t1" in status
    # and nothing in it complained about any of that: every line it logged is the service's own
    assert all(line.startswith("serve: ") for line in container.logs().splitlines()), container.logs()


def test_the_image_holds_no_torch_mlflow_or_dvc_and_the_cpu_onnxruntime(container):
    code = ("import importlib.metadata as m; print(' '.join(sorted(d.metadata['Name'].lower().replace('_', '-') "
            "for d in m.distributions())))")
    installed = set(container.exec("python", "-c", code).stdout.split())
    assert "onnxruntime" in installed and "onnxruntime-gpu" not in installed
    assert not installed & {"torch", "mlflow", "dvc", "pip", "setuptools"}, installed
    assert {"uvicorn", "starlette", "onnx", "numpy", "pillow", "orjson", "prometheus-client"} <= installed


def test_a_model_mounted_over_the_baked_one_is_served_instead(image, small_onnx, tmp_path):
    _, other = small_onnx
    (tmp_path / "models").mkdir()
    shutil.copy(other, tmp_path / "models" / "model.onnx")
    with containers.Container(image, volumes=(f"{tmp_path / 'models'}:/models:ro",)) as c:
        import urllib.request
        with urllib.request.urlopen(f"{c.url}/v2/models/{NAME}", timeout=30) as r:
            assert json.loads(r.read())["versions"] == [runtime.sha256(other)[:12]]


def test_sigterm_answers_the_requests_in_flight_then_exits_0(image):
    body = json.dumps({"inputs": [{"name": contract.INPUT_NAME, "datatype": "FP32", "shape": [1, 1, 28, 28],
                                   "data": [0.0] * 784}]}).encode()
    with containers.Container(image) as c:
        busy = []
        for _ in range(3):  # requests half sent: in flight when the signal lands
            s = socket.create_connection(("127.0.0.1", c.port), timeout=30)
            s.sendall(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
                      .encode() + body[:100])
            busy.append(s)
        time.sleep(1.0)  # read by the server: their bodies are being received
        c.signal("TERM")
        time.sleep(1.0)
        answers = []
        for s in busy:
            s.sendall(body[100:])
            answers.append(read_response(s))
            s.close()
        assert all(a.startswith(b"HTTP/1.1 200") and b'"outputs"' in a for a in answers), answers
        assert c.wait(timeout_s=60) == 0
        log = c.logs()
        assert "shutting down: finishing requests in flight" in log and "serve: stopped" in log, log


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (the server closes the connection after it while shutting down)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        if m := re.search(rb"content-length: (\d+)", head, re.I):
            if len(rest) >= int(m[1]):
                break
    return data


def test_the_image_says_who_it_runs_as_and_what(image):
    config = json.loads(containers.podman("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == "10001:10001" and "8000/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"] == ["python", "-m", "serving", "--host", "0.0.0.0", "--port", "8000",
                                    "--model", "/models/model.onnx"]


def test_image_sh_without_a_model_says_what_to_do(tmp_path):
    checkout = copy_repo(tmp_path)
    (checkout / "models" / "model.onnx").unlink(missing_ok=True)
    result = subprocess.run([str(checkout / "scripts" / "image.sh")], cwd=checkout, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("image: no models/model.onnx to put in the image; make it first: "
                                     "./scripts/repro.sh (or dvc pull)")
