"""The service's Prometheus metrics (``GET /metrics``), with ``prometheus-client``.

Where Triton has a metric for the same thing, ours has its name (``nv_inference_*``, with
the labels ``model`` and ``version``), so dashboards built for Triton read this service too.
One difference comes from the Prometheus client: a counter's samples end in ``_total``
(``nv_inference_count_total``). What Triton has no name for is ``mnist_*``.

    nv_inference_request_success / _failure{reason}   inference requests answered 200 / not
    nv_inference_count, nv_inference_exec_count        images inferred, onnxruntime runs
    nv_inference_request_duration_us                   cumulative request time (infer endpoint)
    nv_inference_queue_duration_us                     cumulative time waiting for the model
    nv_inference_compute_infer_duration_us             cumulative onnxruntime time
    nv_inference_pending_request_count                 requests queued for the model now
    mnist_http_requests_total{endpoint,method,status}  every HTTP request the app answered
    mnist_http_refused_requests_total{reason}          refused before the app saw them (serving/transport.py):
                                                       malformed, headers_too_large, ambiguous_framing
    mnist_http_open_connections                        HTTP connections open now
    mnist_http_request_duration_seconds{endpoint}      request latency (histogram)
    mnist_inference_compute_seconds                    onnxruntime run time (histogram)
    mnist_inference_batch_size                         images per onnxruntime run (histogram)
    mnist_rejected_requests_total{reason}              503s: not_ready, queue_full, memory, parser
    mnist_request_body_bytes_in_memory                 bytes of request bodies held now
    mnist_model_load_seconds                           model load + warm-up time

Every label value is one of a known few: what a client sends (its method) is a label only if
it is a known method, else ``other``. A label that takes any value a client sends is a series
per value, kept until restart: 300 made-up methods made 300 series (tests/test_serve.py; the
issue that found it measured 3,000 methods of 8,000 characters making /metrics 24 MB).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# RFC 9110's methods and PATCH: the method label's values; any other method is counted as "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE"})
REFUSED = ("malformed", "headers_too_large", "ambiguous_framing")  # why serving/transport.py refused a request
disable_created_metrics()  # no *_created samples: they double the page and no dashboard reads them


class Metrics:
    """One registry per service (tests start several in one process)."""

    def __init__(self, model: str):
        self.registry = r = CollectorRegistry(auto_describe=True)
        labels = ["model", "version"]
        self.model, self.version = model, ""
        self._success = Counter("nv_inference_request_success", "Inference requests answered 200",
                                labels, registry=r)
        self._failure = Counter("nv_inference_request_failure", "Inference requests not answered 200",
                                [*labels, "reason"], registry=r)
        self._count = Counter("nv_inference_count", "Images inferred", labels, registry=r)
        self._exec = Counter("nv_inference_exec_count", "onnxruntime runs (batches)", labels, registry=r)
        self._request_us = Counter("nv_inference_request_duration_us",
                                   "Cumulative inference request duration, microseconds", labels, registry=r)
        self._queue_us = Counter("nv_inference_queue_duration_us",
                                 "Cumulative time requests waited for the model, microseconds", labels, registry=r)
        self._compute_us = Counter("nv_inference_compute_infer_duration_us",
                                   "Cumulative onnxruntime run time, microseconds", labels, registry=r)
        self.pending = Gauge("nv_inference_pending_request_count", "Inference requests queued for the model",
                             labels, registry=r)
        self._http = Counter("mnist_http_requests", "HTTP requests answered by the app",
                             ["endpoint", "method", "status"], registry=r)
        self._http_seconds = Histogram("mnist_http_request_duration_seconds", "HTTP request latency",
                                       ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self._compute = Histogram("mnist_inference_compute_seconds", "onnxruntime run time",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self._batch = Histogram("mnist_inference_batch_size", "Images per onnxruntime run",
                                buckets=BATCH_BUCKETS, registry=r)
        self._rejected = Counter("mnist_rejected_requests", "Requests answered 503", ["reason"], registry=r)
        self.body_bytes = Gauge("mnist_request_body_bytes_in_memory", "Bytes of request bodies held in memory",
                                registry=r)
        self.load_seconds = Gauge("mnist_model_load_seconds", "Model load and warm-up time", registry=r)
        self._refused = Counter("mnist_http_refused_requests", "Requests refused before the app saw them",
                                ["reason"], registry=r)
        for reason in REFUSED:
            self._refused.labels(reason)  # present (at 0) from the start
        self.open_connections = Gauge("mnist_http_open_connections", "HTTP connections open now", registry=r)

    def loading(self, version: str) -> None:
        """The model's version is known (before the warm-up run, which is counted under it)."""
        self.version = version
        self.pending.labels(self.model, version).set(0)
        self._success.labels(self.model, version)  # present (at 0) from the start, as Triton's are
        self._count.labels(self.model, version)
        self._exec.labels(self.model, version)

    def loaded(self, seconds: float) -> None:
        self.load_seconds.set(seconds)

    def http(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """``endpoint`` is one of ours; ``method`` is the client's, hence bounded here."""
        self._http.labels(endpoint, method if method in METHODS else "other", str(status)).inc()
        self._http_seconds.labels(endpoint).observe(seconds)

    def refused(self, reason: str) -> None:
        assert reason in REFUSED, reason
        self._refused.labels(reason).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason).inc()

    def inference(self, status: int, seconds: float, reason: str = "") -> None:
        """One request to the infer or digit endpoint has been answered with ``status``."""
        labels = (self.model, self.version)
        if status == 200:
            self._success.labels(*labels).inc()
            self._request_us.labels(*labels).inc(seconds * 1e6)
        else:
            self._failure.labels(*labels, reason or str(status)).inc()

    def batch(self, images: int, seconds: float, waited_s: float) -> None:
        """One onnxruntime run of ``images`` images; ``waited_s`` summed over its requests."""
        labels = (self.model, self.version)
        self._count.labels(*labels).inc(images)
        self._exec.labels(*labels).inc()
        self._compute_us.labels(*labels).inc(seconds * 1e6)
        self._queue_us.labels(*labels).inc(waited_s * 1e6)
        self._compute.observe(seconds)
        self._batch.observe(images)

    def expose(self) -> bytes:
        return generate_latest(self.registry)
