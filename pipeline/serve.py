"""An HTTP inference service for the ONNX model, on onnxruntime alone (no PyTorch).

Endpoints (KServe / Open Inference Protocol v2, as Triton speaks it, plus two of ours):

    GET  /v2/health/live                      200 while the process serves
    GET  /v2/health/ready                     200 once the model has answered a warm-up run
    GET  /v2  /v2/models/<name>[/versions/<v>][/ready]       metadata
    POST /v2/models/<name>[/versions/<v>]/infer               tensors in, logits out
    POST /digit                               a PNG/JPEG of a digit in, digit + probabilities out
    GET  /                                    a page to draw a digit on (pipeline/static/draw.html)

How it stays fast and safe:
- One session, created at start-up; a single batcher thread runs it, so requests that arrive
  together run as one batch (the ``Batcher``), up to ``max_batch`` images.
- Admission control: beyond ``max_concurrency`` requests in flight, a request is answered
  503 at once (with Retry-After), before its body is read; so is a body over
  ``max_body_bytes``, with 413. A client's mistake is always a 4xx and the server stays up.
- Graceful shutdown on SIGTERM/SIGINT: readiness turns false, no new connection is taken,
  requests in flight finish (up to ``shutdown_grace_s``), idle keep-alive connections close.
"""
from __future__ import annotations

import contextlib
import functools
import http
import http.server
import json
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from pipeline import digits, evaluate, protocol, runtime
from pipeline.errors import PipelineError
from pipeline.params import require

PAGE = Path(__file__).with_name("static") / "draw.html"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing the service is a deliberate choice
    port: int = 8000  # 0 = any free port (printed at start-up)
    provider: str = "cpu"  # cpu | cuda | tensorrt (falls back to CPU, and says so)
    threads: int = 0  # onnxruntime intra-op threads; 0 = one per core
    max_batch: int = 256  # images per request and per onnxruntime run
    batching: bool = True  # join concurrent requests into one onnxruntime run (up to max_batch images)
    batch_delay_ms: float = 0.0  # wait this long for more requests to fill a batch; 0 = take what is queued
    max_concurrency: int = 64  # requests in flight; beyond it, 503 at once
    max_body_bytes: int = 16 * 2**20  # a full 256-image JSON request is about 4 MB
    idle_timeout_s: float = 15.0  # a keep-alive connection silent this long is closed
    shutdown_grace_s: float = 30.0  # how long requests in flight may take to finish at shutdown

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "serve.port", self.port, "0..65535")
        require(self.provider in runtime.PROVIDERS, "serve.provider", self.provider, "cpu | cuda | tensorrt")
        require(self.threads >= 0, "serve.threads", self.threads, "a whole number >= 0")
        require(self.max_batch >= 1, "serve.max_batch", self.max_batch, "a whole number >= 1")
        require(self.batch_delay_ms >= 0, "serve.batch_delay_ms", self.batch_delay_ms, "a number >= 0")
        require(self.max_concurrency >= 1, "serve.max_concurrency", self.max_concurrency, "a whole number >= 1")
        require(self.max_body_bytes >= 1024, "serve.max_body_bytes", self.max_body_bytes, "at least 1024")
        require(self.idle_timeout_s > 0, "serve.idle_timeout_s", self.idle_timeout_s, "a number > 0")
        require(self.shutdown_grace_s >= 0, "serve.shutdown_grace_s", self.shutdown_grace_s, "a number >= 0")


_STOP = object()  # put on the queue by Batcher.close


class ServeError(PipelineError, RuntimeError):
    """The service cannot start as configured (for example, its port is taken)."""


class _Job:
    __slots__ = ("x", "result", "error", "done")

    def __init__(self, x: np.ndarray):
        self.x = x
        self.result: np.ndarray | None = None
        self.error: Exception | None = None
        self.done = threading.Event()


class Batcher:
    """Runs ``run`` on one thread, joining the requests queued meanwhile into one batch."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int, delay_s: float = 0.0):
        self._run, self._max, self._delay = run, max_batch, delay_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # _Job or _STOP
        self._carry: _Job | object | None = None  # a job that did not fit the last batch, or _STOP
        self.runs = self.images = 0
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits for ``x`` (N, ...); blocks until its batch has run."""
        job = _Job(x)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None  # the batcher sets one or the other
        return job.result

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _collect(self) -> list[_Job] | None:
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        if not isinstance(first, _Job):  # _STOP
            return None
        jobs, n = [first], len(first.x)
        deadline = time.monotonic() + self._delay
        while n < self._max:
            try:
                wait = deadline - time.monotonic()
                job = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(job, _Job) or n + len(job.x) > self._max:
                self._carry = job  # the sentinel, or a job for the next batch
                break
            jobs.append(job)
            n += len(job.x)
        return jobs

    def _loop(self) -> None:
        while (jobs := self._collect()) is not None:
            x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
            try:
                y = self._run(x)
            except Exception as e:  # noqa: BLE001 - handed to every waiting request, never lost
                for j in jobs:
                    j.error = e
            else:
                start = 0
                for j in jobs:
                    j.result, start = y[start:start + len(j.x)], start + len(j.x)
            self.runs, self.images = self.runs + 1, self.images + len(x)
            for j in jobs:
                j.done.set()


class Service:
    """The model, its batcher and the state every request handler shares."""

    def __init__(self, model_path: str | os.PathLike, name: str, cfg: ServeConfig,
                 parameters: dict[str, str] | None = None):
        self.cfg = cfg
        self.parameters = parameters or {}  # said about the model beside its own metadata (registry version)
        self.model_path = Path(model_path)
        self.ready = threading.Event()
        self.draining = threading.Event()
        self.page = PAGE.read_bytes()
        self._lock = threading.Lock()
        self.in_flight = 0
        self.started = time.time()
        self.name = name
        # set by load(), before the service is ready: no request reaches them earlier
        self.spec: protocol.ModelSpec
        self.batcher: Batcher
        self.session: runtime.Session

    def load(self) -> None:
        """Open the session once and warm it up; only then is the service ready."""
        model = runtime.load_checked(self.model_path)
        graph_in, graph_out = model.graph.input[0], model.graph.output[0]

        def dims(v: onnx.ValueInfoProto) -> tuple[int, ...]:
            return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
        sha256 = runtime.sha256(self.model_path)
        self.spec = protocol.ModelSpec(
            name=self.name, version=sha256[:12], platform="onnxruntime_onnx",
            input=protocol.TensorSpec(graph_in.name, "FP32", dims(graph_in)),
            output=protocol.TensorSpec(graph_out.name, "FP32", dims(graph_out)),
            parameters={**runtime.metadata(model), "sha256": sha256, **self.parameters})
        self.session = runtime.open_session(model, self.cfg.provider, self.cfg.threads)
        del model  # the session holds its own copy; the protobuf would only cost memory
        # Without batching, each request runs alone: a batch limit of 1 image never joins two jobs.
        self.batcher = Batcher(self.session.run, self.cfg.max_batch if self.cfg.batching else 1,
                               self.cfg.batch_delay_ms / 1000)
        example = np.zeros((1, *self.spec.input.shape[1:]), np.float32)
        self.batcher(example)  # the warm-up run: the first run pays for memory planning
        self.ready.set()

    def admit(self) -> bool:
        with self._lock:
            if self.in_flight >= self.cfg.max_concurrency:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.batcher(x)


_MODEL = r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
# Every endpoint: (path, {method: the Handler method that answers it}). GET also answers HEAD.
ROUTES: list[tuple[re.Pattern, dict[str, str]]] = [
    (re.compile(r"^/(index\.html)?$"), {"GET": "_page"}),
    (re.compile(r"^/v2/health/live$"), {"GET": "_live"}),
    (re.compile(r"^/v2/health/ready$"), {"GET": "_ready"}),
    (re.compile(r"^/v2$"), {"GET": "_server_metadata"}),
    (re.compile(_MODEL + r"$"), {"GET": "_model_metadata"}),
    (re.compile(_MODEL + r"/ready$"), {"GET": "_model_ready"}),
    (re.compile(_MODEL + r"/infer$"), {"POST": "_infer"}),
    (re.compile(r"^/digit$"), {"POST": "_digit"}),
]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    server_version = "mnist-onnx-serve"
    server: Server

    # -- plumbing -------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.service.cfg.idle_timeout_s)
        self.busy = False
        self.server.track(self, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self, False)

    def parse_request(self) -> bool:
        self.busy = True  # a request line has arrived: from here on, shutdown waits for it
        return super().parse_request()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            self.busy = False

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers, method), as JSON, and never 5xx."""
        if code == 501:  # an unknown method is the client's mistake
            code, message = 405, f"method {self.command!r} is not supported here: use GET or POST"
        self.request_version = "HTTP/1.1"  # we do not speak HTTP/0.9: always send a status line
        with contextlib.suppress(OSError):
            self._error(code, message or http.HTTPStatus(code).phrase, close=True)

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict | None = None, close: bool = False) -> None:
        close = close or self.server.service.draining.is_set()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict, **kw) -> None:
        self._send(status, json.dumps(payload).encode(), **kw)

    def _error(self, status: int, message: str, **kw) -> None:
        self._json(status, {"error": message}, **kw)

    def _read_body(self) -> bytes | None:
        """The body, or None after answering why it can't be read (the connection then closes)."""
        if self.headers.get("Transfer-Encoding"):
            self._error(411, "send the body with a Content-Length (chunked encoding is not accepted)", close=True)
            return None
        length = self.headers.get("Content-Length")
        if length is None:
            self._error(411, "a Content-Length header is required", close=True)
            return None
        if not length.isdigit():
            self._error(400, f"Content-Length {length!r} is not a whole number", close=True)
            return None
        if int(length) > self.server.service.cfg.max_body_bytes:
            # Refused before reading: the client learns at once and the server reads nothing.
            self._error(413, f"body of {int(length):,} bytes is over the limit of "
                             f"{self.server.service.cfg.max_body_bytes:,}", close=True)
            return None
        body = self.rfile.read(int(length))
        if len(body) < int(length):  # the client went away mid-body
            self.close_connection = True
            return None
        return body

    # -- routes: ROUTES (above) maps each path and method to one of these -----------------
    def do_HEAD(self) -> None:
        self._dispatch("GET")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        close = method == "POST"  # a body we will not read must not be taken for the next request
        for pattern, handlers in ROUTES:
            if match := pattern.match(path):
                if method not in handlers:
                    allowed = ", ".join(handlers)
                    return self._error(405, f"{path} takes {allowed}", headers={"Allow": allowed}, close=close)
                handler = getattr(self, handlers[method])
                if method == "POST":  # inference: admission control around it
                    return self._guarded(functools.partial(handler, match))
                return handler(match)
        return self._error(404, f"no such endpoint: {path}", close=close)

    def _page(self, match: re.Match) -> None:
        self._send(200, self.server.service.page, "text/html; charset=utf-8")

    def _live(self, match: re.Match) -> None:
        self._json(200, {"live": True})

    def _ready(self, match: re.Match) -> None:
        svc = self.server.service
        ready = svc.ready.is_set() and not svc.draining.is_set()
        self._json(200 if ready else 503, {"ready": ready})

    def _server_metadata(self, match: re.Match) -> None:
        self._json(200, {"name": "mnist-onnx-serve", "version": "1", "extensions": ["model_repository_readonly"]})

    def _model_metadata(self, match: re.Match) -> None:
        if self._known_model(match, close=False):
            self._json(200, self.server.service.spec.metadata())

    def _model_ready(self, match: re.Match) -> None:
        svc = self.server.service
        if self._known_model(match, close=False):
            self._json(200 if svc.ready.is_set() else 503, {"name": svc.name, "ready": svc.ready.is_set()})

    def _guarded(self, handle: Callable[[], None]) -> None:
        """Admission control around one inference request."""
        svc = self.server.service
        if not svc.ready.is_set() or svc.draining.is_set():
            why = "shutting down" if svc.draining.is_set() else "warming up"
            return self._error(503, f"not ready ({why}); retry shortly", headers={"Retry-After": "1"}, close=True)
        if not svc.admit():
            return self._error(503, f"over capacity ({svc.cfg.max_concurrency} requests in flight); retry shortly",
                               headers={"Retry-After": "1"}, close=True)
        try:
            handle()
        except protocol.RequestError as e:
            self._error(e.status, str(e))
        except digits.ImageError as e:
            self._error(422 if "blank" in str(e) else 400, str(e))
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug of ours: say so, and keep serving
            self.log_error("internal error: %r", e)
            self._error(500, f"internal error: {type(e).__name__}")
        finally:
            svc.release()

    def _known_model(self, match: re.Match, close: bool) -> bool:
        """False after answering 404; ``close`` when a request body is left unread."""
        svc = self.server.service
        if match["name"] != svc.name:
            self._error(404, f"unknown model {match['name']!r}; this server has {svc.name!r}", close=close)
            return False
        if match["version"] is not None and match["version"] != svc.spec.version:
            self._error(404, f"unknown version {match['version']!r} of {svc.name!r}; "
                             f"this server has {svc.spec.version!r}", close=close)
            return False
        return True

    def _infer(self, match: re.Match) -> None:
        if not self._known_model(match, close=True):
            return
        body = self._read_body()
        if body is None:
            return
        svc = self.server.service
        header_length = self.headers.get("Inference-Header-Content-Length")
        if header_length is not None and not header_length.isdigit():
            raise protocol.RequestError(f"Inference-Header-Content-Length {header_length!r} is not a whole number")
        request = protocol.parse_infer(body, svc.spec, svc.cfg.max_batch,
                                       None if header_length is None else int(header_length))
        answer, json_length = protocol.infer_response(svc.spec, svc.infer(request.x), request)
        if json_length is None:
            return self._send(200, answer)
        self._send(200, answer, "application/octet-stream",
                   headers={"Inference-Header-Content-Length": str(json_length)})

    def _digit(self, match: re.Match) -> None:
        body = self._read_body()
        if body is None:
            return
        svc = self.server.service
        probabilities = evaluate.softmax(svc.infer(digits.image_to_input(body)))[0]
        self._json(200, {"model_name": svc.name, "model_version": svc.spec.version,
                         "digit": int(probabilities.argmax()),
                         "probabilities": [round(float(p), 6) for p in probabilities]})


class Server(http.server.ThreadingHTTPServer):
    """One thread per connection; tracks them so shutdown can wait for the busy ones."""

    daemon_threads = True  # we join the busy ones ourselves, with a deadline
    request_queue_size = 128  # listen backlog: bursts of new connections wait instead of being refused

    def __init__(self, service: Service, verbose: bool = False):
        self.service, self.verbose = service, verbose
        self._handlers: set[Handler] = set()
        self._handlers_changed = threading.Condition()
        super().__init__((service.cfg.host, service.cfg.port), Handler)

    def track(self, handler: Handler, alive: bool) -> None:
        with self._handlers_changed:
            (self._handlers.add if alive else self._handlers.discard)(handler)
            self._handlers_changed.notify_all()

    def drain(self, grace_s: float) -> int:
        """Stop taking connections, let requests in flight finish; returns how many were cut off."""
        self.service.draining.set()
        self.shutdown()  # serve_forever returns; the listening socket stops accepting
        self.socket.close()
        deadline = time.monotonic() + grace_s
        with self._handlers_changed:
            while self._handlers:
                idle = [h for h in self._handlers if not h.busy]
                for h in idle:  # waiting for a next request that will not come: end the wait
                    with contextlib.suppress(OSError):  # it may have closed meanwhile
                        h.connection.shutdown(socket.SHUT_RD)
                left = deadline - time.monotonic()
                if left <= 0:
                    return len(self._handlers)
                self._handlers_changed.wait(min(left, 0.1))
        return 0



def serve(model_path: str | os.PathLike, name: str, cfg: ServeConfig, verbose: bool = False,
          log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
          parameters: dict[str, str] | None = None) -> int:
    """Run the service until SIGTERM or SIGINT; returns the process exit code. ``parameters``
    join the model file's own metadata in GET /v2/models/<name>."""
    service = Service(model_path, name, cfg, parameters)
    try:
        server = Server(service, verbose)  # bound now: /v2/health/live answers during warm-up
    except OSError as e:
        raise ServeError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); choose another --port "
                         "(0 = any free one) or stop what is using it") from None
    host, port = str(server.server_address[0]), server.server_address[1]
    log(f"serve: listening on http://{host}:{port} (model {name!r} from {model_path}; not ready until warmed up)")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http")
    thread.start()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        t0 = time.perf_counter()
        service.load()
        note = f" ({service.session.note})" if service.session.note else ""
        log(f"serve: ready in {time.perf_counter() - t0:.2f} s: model version {service.spec.version}, "
            f"onnxruntime on {service.session.label}{note}; "
            f"open http://{host}:{port}/ to draw a digit")
    except Exception:
        server.drain(0)
        thread.join()
        raise
    while not stop.wait(0.5):
        pass
    log("serve: shutting down: finishing requests in flight")
    cut = server.drain(cfg.shutdown_grace_s)
    thread.join()
    service.batcher.close()
    b = service.batcher
    mean = b.images / max(b.runs, 1)
    log(f"serve: stopped; {b.images:,} images in {b.runs:,} onnxruntime runs (mean batch {mean:.1f})"
        + (f"; {cut} request(s) cut off after the grace period" if cut else ""))
    return 0 if not cut else 1
