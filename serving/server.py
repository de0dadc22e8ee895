"""An HTTP inference service for the ONNX model, on onnxruntime alone (no PyTorch).

Endpoints (KServe / Open Inference Protocol v2, as Triton speaks it, plus three of ours):

    GET  /v2/health/live                      200 while the process serves
    GET  /v2/health/ready                     200 once the model has answered a warm-up run
    GET  /v2  /v2/models/<name>[/versions/<v>][/ready]       metadata
    POST /v2/models/<name>[/versions/<v>]/infer               tensors in, logits out
    POST /digit                               a PNG/JPEG of a digit in, digit + probabilities out
    GET  /metrics                             Prometheus text format (serving/metrics.py)
    GET  /                                    a page to draw a digit on (serving/static), or with --site the
                                              web stage's static site: the page runs the model in the browser

The transport is not ours: uvicorn (with the h11 parser) speaks HTTP, with its limits, timeouts
and graceful shutdown, and Starlette routes the requests (docs/serving.md says what was compared).
What is ours:
- Three things uvicorn and h11 do not (serving/transport.py): a request head over its limits is
  refused however it arrives (431), a request with both Content-Length and Transfer-Encoding is
  refused and its connection closed, and what is refused before the app is counted.
- One onnxruntime session, opened after the port is bound (``/v2/health/live`` answers while it
  loads); ready once a warm-up run has answered. A ``Batcher`` runs it on one thread and joins
  the requests that queue up meanwhile into one run, up to ``max_batch`` images.
- Admission (serving/admission.py): bodies are read within ``body_timeout_s`` and a memory
  budget shared by all requests (``body_memory_bytes``); a request takes a place among the
  ``max_concurrency`` inference requests only once its body is read and parsed, so slow or idle
  clients never hold one. Beyond either limit: 503 at once, with Retry-After.
- JSON bodies over ``parse_inline_bytes`` are parsed in a worker process (serving/parsing.py),
  so a burst of large bodies never stalls the event loop and the small requests behind it.
- A client's mistake is a 4xx with a JSON ``error``; a bug of ours is a 500, logged with its traceback.
- SIGTERM/SIGINT: readiness turns false, the port stops accepting, requests in flight finish (up
  to ``shutdown_grace_s``), idle keep-alive connections close.
"""
from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import os
import resource
import signal
import socket
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from pipeline import digits, evaluate, runtime
from pipeline.errors import PipelineError
from serving import admission, parsing, protocol, transport
from serving.batcher import Batcher
from serving.config import ServeConfig
from serving.metrics import CONTENT_TYPE, Metrics

STATIC = Path(__file__).with_name("static")  # the page; the web stage's site is it, the model and onnxruntime-web
EXTENSIONS = ["binary_tensor_data"]  # the v2 extensions this server implements, and only those


class ServeError(PipelineError, RuntimeError):
    """The service cannot start as configured (for example, its port is taken)."""


class Service:
    """The model, its batcher, the admission limits and the metrics every request shares."""

    def __init__(self, model_path: str | os.PathLike, name: str, cfg: ServeConfig,
                 parameters: dict[str, str] | None = None,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)):
        self.cfg, self.name, self.log = cfg, name, log
        self.parameters = parameters or {}  # said about the model beside its own metadata (registry version)
        self.model_path = Path(model_path)
        self.site = Path(cfg.site) if cfg.site else STATIC
        if not (self.site / "index.html").is_file():
            raise ServeError(f"--site {cfg.site}: no index.html there; build the site with: dvc repro web")
        self.metrics = Metrics(name)
        self.bodies = admission.BodyBudget(cfg.body_memory_bytes)
        self.slots = admission.Slots(cfg.max_concurrency)
        self.decoding = asyncio.Semaphore(1)  # one picture decoded at a time: its pixels are the big cost
        self.parser = parsing.Parser(cfg.parse_inline_bytes)  # large JSON bodies: in a worker process
        self.ready = self.draining = False
        self.cut_off = 0  # requests cancelled when the shutdown grace ran out
        # set by start(), before the service is ready: no request reaches them earlier
        self.spec: protocol.ModelSpec
        self.batcher: Batcher
        self.session: runtime.Session

    def _open(self) -> None:
        """Read, check and open the model (blocking: run off the event loop)."""
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
        # No spinning: onnxruntime's idle threads would otherwise burn the cores the event loop
        # needs between batches (measured: 1,190 vs 1,106 requests/s, server CPU 6 vs 12 s).
        self.session = runtime.open_session(model, self.cfg.provider, self.cfg.threads,
                                            config={"session.intra_op.allow_spinning": "0"})

    async def start(self) -> float:
        """Open the session and warm it up; only then is the service ready. Returns the seconds taken."""
        t0 = time.perf_counter()
        await asyncio.gather(asyncio.to_thread(self._open), self.parser.warm_up())
        self.metrics.loading(self.spec.version)
        # Without batching, each request runs alone: a batch limit of 1 image never joins two jobs.
        self.batcher = Batcher(self.session.run, self.cfg.max_batch if self.cfg.batching else 1,
                               self.cfg.batch_delay_ms / 1000, self.metrics.batch)
        await self.batcher(np.zeros((1, *self.spec.input.shape[1:]), np.float32))  # pays for memory planning
        seconds = time.perf_counter() - t0
        self.metrics.loaded(seconds)
        self.ready = True
        return seconds

    def check_ready(self) -> None:
        if not self.ready or self.draining:
            raise admission.Unavailable(f"not ready ({'shutting down' if self.draining else 'warming up'}); "
                                        "retry shortly", "not_ready")

    async def infer(self, x: np.ndarray) -> np.ndarray:
        self.slots.take()
        pending = self.metrics.pending.labels(self.name, self.spec.version)
        pending.set(self.slots.used)
        try:
            return await self.batcher(x)
        finally:
            self.slots.give()
            pending.set(self.slots.used)

    @contextlib.asynccontextmanager
    async def body(self, request: Request) -> AsyncIterator[bytes]:
        """The request's body, within the limits and decompressed; its bytes count against the
        budget until the block ends."""
        request.state.body_started = True
        declared = _whole_number(request.headers.get("content-length"), "Content-Length")
        encoding = admission.content_encoding(request.headers.get("content-encoding"))
        inflated = 0
        try:
            async with admission.read_body(request.stream(), declared, self.cfg.max_body_bytes, self.bodies,
                                           self.cfg.body_timeout_s) as body:
                request.state.body_read = True
                if encoding is not None:  # zlib lets go of the GIL while it decompresses
                    body = await asyncio.to_thread(admission.inflate, body, encoding, self.cfg.max_body_bytes)
                    self.bodies.take(len(body))
                    inflated = len(body)
                self.metrics.body_bytes.set(self.bodies.used)
                yield body
        finally:
            self.bodies.give(inflated)
            self.metrics.body_bytes.set(self.bodies.used)

    async def close(self) -> None:
        if hasattr(self, "batcher"):
            await self.batcher.close()
        await asyncio.to_thread(self.parser.close)


def _whole_number(value: str | None, header: str) -> int | None:
    """A header that must hold a whole number in ASCII digits (``'²'.isdigit()`` is True)."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise protocol.RequestError(f"{header} {value[:40]!r} is not a whole number")
    return int(value)


def _json(status: int, payload: dict, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status, headers, media_type="application/json")


class Api:
    """The endpoints; each is wrapped by ``_endpoint``, which turns errors into answers and counts them."""

    def __init__(self, service: Service):
        self.svc = service

    def routes(self) -> list[Route]:
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        e = self._endpoint
        return [
            *[Route(path, e("page", self._file(file))) for path, file in self.site_files().items()],
            Route("/v2/health/live", e("live", self.live)),
            Route("/v2/health/ready", e("ready", self.ready)),
            Route("/v2", e("server_metadata", self.server_metadata)),
            Route(model, e("model_metadata", self.model_metadata)),
            Route(versioned, e("model_metadata", self.model_metadata)),
            Route(model + "/ready", e("model_ready", self.model_ready)),
            Route(versioned + "/ready", e("model_ready", self.model_ready)),
            Route(model + "/infer", e("infer", self.infer), methods=["POST"]),
            Route(versioned + "/infer", e("infer", self.infer), methods=["POST"]),
            Route("/digit", e("digit", self.digit), methods=["POST"]),
            Route("/metrics", e("metrics", self.metrics)),
        ]

    def _endpoint(self, label: str, handle: Callable[[Request], Awaitable[Response]]):
        svc = self.svc
        inference = label in ("infer", "digit")

        async def endpoint(request: Request) -> Response:
            t0 = time.perf_counter()
            reason = ""
            try:
                response = await handle(request)
            except protocol.RequestError as e:
                response, reason = _json(e.status, {"error": str(e)}), "invalid_request"
            except digits.ImageError as e:
                response, reason = _json(422 if "blank" in str(e) else 400, {"error": str(e)}), "invalid_request"
            except admission.Unavailable as e:
                svc.metrics.rejected(e.reason)  # every 503, counted once, here
                response, reason = _json(503, {"error": str(e)}, {"Retry-After": "1"}), e.reason
            except ClientDisconnect:
                response, reason = Response(status_code=499), "client_gone"  # nobody reads it
            except asyncio.CancelledError:
                svc.cut_off += 1  # the shutdown grace ran out while this request was in flight
                raise
            except Exception as e:  # noqa: BLE001 - a bug of ours: log it whole, say so, keep serving
                svc.log(f"serve: internal error on {request.method} {request.url.path}:\n"
                        + "".join(traceback.format_exception(e)).rstrip())
                response, reason = _json(500, {"error": f"internal error: {type(e).__name__}"}), "error"
            if getattr(request.state, "body_started", False) and not getattr(request.state, "body_read", False):
                response.headers["Connection"] = "close"  # the unread rest must not be taken for a request
            if svc.draining:
                response.headers["Connection"] = "close"
            seconds = time.perf_counter() - t0
            svc.metrics.http(label, request.method, response.status_code, seconds)
            if inference:
                svc.metrics.inference(response.status_code, seconds, reason)
            return response
        return endpoint

    def _known_model(self, request: Request) -> None:
        svc, name, version = self.svc, request.path_params["name"], request.path_params.get("version")
        if name != svc.name:
            raise protocol.RequestError(f"unknown model {name!r}; this server has {svc.name!r}", 404)
        if version is not None and (not svc.ready or version != svc.spec.version):
            have = svc.spec.version if svc.ready else "(loading)"
            raise protocol.RequestError(f"unknown version {version!r} of {svc.name!r}; this server has {have}", 404)

    def site_files(self) -> dict[str, Path]:
        """URL path -> file, for every file of the site folder, listed once at start-up (so an unknown
        path is a 404 like any other, and no request can name a file outside the folder)."""
        site = self.svc.site
        files = {"/" + f.relative_to(site).as_posix(): f for f in sorted(site.rglob("*")) if f.is_file()}
        return {"/": site / "index.html", **files}

    @staticmethod
    def _file(path: Path) -> Callable[[Request], Awaitable[Response]]:
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"  # .wasm: application/wasm

        async def send(request: Request) -> Response:
            return FileResponse(path, media_type=media_type)
        return send

    async def live(self, request: Request) -> Response:
        return _json(200, {"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.svc.ready and not self.svc.draining
        return _json(200 if ready else 503, {"ready": ready})

    async def server_metadata(self, request: Request) -> Response:
        return _json(200, {"name": "mnist-onnx-serve", "version": "2", "extensions": EXTENSIONS})

    async def model_metadata(self, request: Request) -> Response:
        self._known_model(request)
        if not self.svc.ready:
            raise admission.Unavailable("the model is still loading; retry shortly", "not_ready")
        return _json(200, self.svc.spec.metadata())

    async def model_ready(self, request: Request) -> Response:
        self._known_model(request)
        return _json(200 if self.svc.ready else 503, {"name": self.svc.name, "ready": self.svc.ready})

    async def metrics(self, request: Request) -> Response:
        return Response(self.svc.metrics.expose(), media_type=CONTENT_TYPE)

    async def infer(self, request: Request) -> Response:
        svc = self.svc
        self._known_model(request)
        svc.check_ready()
        header_length = _whole_number(request.headers.get("inference-header-content-length"),
                                      "Inference-Header-Content-Length")
        async with svc.body(request) as body:
            parsed = await svc.parser.parse(body, svc.spec, svc.cfg.max_batch, header_length)
        answer, json_length = protocol.infer_response(svc.spec, await svc.infer(parsed.x), parsed)
        if json_length is None:
            return Response(answer, media_type="application/json")
        return Response(answer, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(json_length)})

    async def digit(self, request: Request) -> Response:
        svc = self.svc
        svc.check_ready()
        async with svc.body(request) as body, svc.decoding:
            x = await asyncio.to_thread(digits.image_to_input, body)  # Pillow decodes without the GIL
        probabilities = evaluate.softmax(await svc.infer(x))[0]
        return _json(200, {"model_name": svc.name, "model_version": svc.spec.version,
                           "digit": int(probabilities.argmax()),
                           "probabilities": [round(float(p), 6) for p in probabilities]})


def create_app(service: Service, on_fatal: Callable[[BaseException], None]) -> Starlette:
    """The ASGI app; its lifespan loads the model in the background and ``on_fatal`` hears if that fails."""
    api = Api(service)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def start() -> None:
            try:
                seconds = await service.start()
            except Exception as e:  # noqa: BLE001 - reported to serve(), which exits with it
                on_fatal(e)
                return
            note = f" ({service.session.note})" if service.session.note else ""
            service.log(f"serve: ready in {seconds:.2f} s: model version {service.spec.version}, "
                        f"onnxruntime on {service.session.label}{note}")
        loading = asyncio.create_task(start(), name="load")
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await service.close()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)  # registered for HTTPException only
        if exc.status_code == 405:
            message = f"{request.url.path} takes {exc.headers.get('Allow') if exc.headers else 'another method'}"
        else:
            message = f"no such endpoint: {request.url.path}"
        response = _json(exc.status_code, {"error": message}, exc.headers)
        if request.method not in ("GET", "HEAD"):
            response.headers["Connection"] = "close"  # its body was never read
        service.metrics.http("unknown", request.method, exc.status_code, 0.0)
        return response

    return Starlette(routes=api.routes(), lifespan=lifespan, exception_handlers={HTTPException: http_error})


class _Server(uvicorn.Server):
    """uvicorn's server, which also turns readiness off the moment a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.service.draining:
            self.service.draining = True
            self.service.log("serve: shutting down: finishing requests in flight")
        super().handle_exit(sig, frame)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0 = any free port), or a ServeError that says what to do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP said outright: asyncio turns Nagle's algorithm off only on sockets that say it,
    # and with Nagle on, a response written as headers then body waits for the client's delayed
    # ACK: 40 ms on every keep-alive request after the first (measured: 44 ms vs 3 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                         "(0 = any free one) or stop what is using it") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def serve(model_path: str | os.PathLike, name: str, cfg: ServeConfig, verbose: bool = False,
          log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
          parameters: dict[str, str] | None = None) -> int:
    """Run the service until SIGTERM or SIGINT; returns the process exit code. ``parameters``
    join the model file's own metadata in GET /v2/models/<name>."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # every open connection is a descriptor
    service = Service(model_path, name, cfg, parameters, log)
    sock = listen(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    log(f"serve: listening on http://{host}:{port} (model {name!r} from {model_path}; not ready until warmed up; "
        f"open http://{host}:{port}/ to draw a digit)")
    fatal: list[BaseException] = []
    servers: list[_Server] = []

    def on_fatal(e: BaseException) -> None:  # the model could not be loaded: stop, then raise it
        fatal.append(e)
        servers[0].should_exit = True
    config = uvicorn.Config(
        transport.refuse_ambiguous_framing(create_app(service, on_fatal), service.metrics),
        http=transport.guarded_h11(service.metrics), h11_max_incomplete_event_size=transport.MAX_HEAD_BYTES,
        loop="asyncio", lifespan="on", access_log=verbose,
        log_level="info" if verbose else "warning", timeout_keep_alive=cfg.idle_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=cfg.shutdown_grace_s, server_header=False, backlog=1024)  # type: ignore[arg-type]
    server = _Server(config, service)
    servers.append(server)
    # uvicorn re-raises the stop signal once it has stopped: let it land on a handler that ignores it
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if fatal:
        raise fatal[0]
    b = service.batcher if hasattr(service, "batcher") else None
    runs, images = (b.runs, b.images) if b else (0, 0)
    log(f"serve: stopped; {images:,} images in {runs:,} onnxruntime runs (mean batch {images / max(runs, 1):.1f})"
        + (f"; {service.cut_off} request(s) cut off after the grace period" if service.cut_off else ""))
    return 0 if not service.cut_off else 1
