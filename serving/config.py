"""The service's settings (params.yaml ``serve``), and the command line made from them.

Every field of ``ServeConfig`` is a flag of both entry points, ``python -m serving`` (the
deployable: defaults, or ``--params FILE``) and ``python -m commands.serve`` (a checkout:
params.yaml). The flags are generated from the fields, so a new setting can't be missed.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline import contract
from pipeline.params import flags, overrides, require


def _setting(default: Any, help: str) -> Any:  # noqa: A002 - argparse's word for it
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServeConfig:
    host: str = _setting("127.0.0.1", "address to bind: 127.0.0.1 is this machine only, 0.0.0.0 every interface")
    port: int = _setting(8000, "port; 0 = any free one (printed at start-up)")
    provider: Literal["cpu", "cuda", "tensorrt"] = _setting("cpu", "onnxruntime's provider (falls back to CPU, "
                                                                   "and says so)")
    threads: int = _setting(0, "onnxruntime intra-op threads; 0 = one per core")
    max_batch: int = _setting(256, "images per request and per onnxruntime run")
    batching: bool = _setting(True, "join concurrent requests into one onnxruntime run (up to max_batch images)")
    batch_delay_ms: float = _setting(0.0, "wait this long for more requests to fill a batch; 0 = take what is "
                                          "queued")
    max_concurrency: int = _setting(64, "inference requests queued or running; beyond it, 503 at once")
    max_body_bytes: int = _setting(16 * 2**20, "one request body; a full 256-image JSON request is about 4 MB")
    body_memory_bytes: int = _setting(128 * 2**20, "request bodies held in memory, all requests together; "
                                                   "beyond it, 503")
    body_timeout_s: float = _setting(30.0, "a body must arrive whole within this; else 408")
    parse_inline_bytes: int = _setting(256 * 1024, "JSON up to this is parsed on the event loop; larger bodies in a "
                                                   "worker process, one at a time, so the loop keeps answering")
    idle_timeout_s: float = _setting(15.0, "a keep-alive connection silent this long is closed")
    shutdown_grace_s: float = _setting(30.0, "how long requests in flight may take to finish at shutdown")
    site: str = _setting("", "a static site folder to serve at / (the web stage's models/web: the page then runs "
                             "the model in the browser too); empty: the page alone, answered by this service")

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "serve.port", self.port, "0..65535")
        require(self.threads >= 0, "serve.threads", self.threads, "a whole number >= 0")
        require(self.max_batch >= 1, "serve.max_batch", self.max_batch, "a whole number >= 1")
        require(self.batch_delay_ms >= 0, "serve.batch_delay_ms", self.batch_delay_ms, "a number >= 0")
        require(self.max_concurrency >= 1, "serve.max_concurrency", self.max_concurrency, "a whole number >= 1")
        require(self.max_body_bytes >= 1024, "serve.max_body_bytes", self.max_body_bytes, "at least 1024")
        require(self.body_memory_bytes >= self.max_body_bytes, "serve.body_memory_bytes", self.body_memory_bytes,
                f"at least serve.max_body_bytes ({self.max_body_bytes}), or no full-size body is ever accepted")
        require(self.parse_inline_bytes >= 0, "serve.parse_inline_bytes", self.parse_inline_bytes,
                "a whole number of bytes >= 0 (0 = every body in the worker)")
        require(self.body_timeout_s > 0, "serve.body_timeout_s", self.body_timeout_s, "a number > 0")
        require(self.idle_timeout_s > 0, "serve.idle_timeout_s", self.idle_timeout_s, "a number > 0")
        require(self.shutdown_grace_s >= 0, "serve.shutdown_grace_s", self.shutdown_grace_s, "a number >= 0")


def command_line(prog: str, description: str | None, model_default: str) -> argparse.ArgumentParser:
    """The service's command line: the model, its name, logging, and one flag per ServeConfig field."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=model_default, help=f"the ONNX model to serve (default {model_default})")
    parser.add_argument("--name", help=f"model name in the v2 API (default: registry.model_name, "
                                       f"{contract.RegistryConfig.model_name})")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    flags(parser, ServeConfig, "serve")
    return parser


def configured(base: ServeConfig, args: argparse.Namespace) -> ServeConfig:
    """``base`` with every flag the command line set."""
    return dataclasses.replace(base, **overrides(args, ServeConfig))
