"""What the service lets in: request bodies within a memory budget and a deadline, and
inference work within a queue limit.

Two separate resources, so that a slow client can never starve inference:

- ``BodyBudget``: the bytes of request bodies held in memory, across all requests, charged as
  they arrive (a client trickling one byte a second holds one byte, not its Content-Length);
  a request that would take it over the limit is refused with 503 at once.
- ``Slots``: inference requests queued for or running on the model. A request takes one only
  once its body is read and parsed, so an open connection, an idle client or a slow upload
  costs a coroutine and a socket, never a place in the inference queue.

A compressed body (``Content-Encoding: gzip`` or ``deflate``, as Triton and its clients send
them) is held to the same ``max_bytes`` once decompressed (``inflate``), and its decompressed
bytes count against the budget too.

Both live on the event loop's thread; nothing here locks.
"""
from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterable, AsyncIterator

from pipeline.errors import PipelineError
from serving.protocol import RequestError


class Unavailable(PipelineError, RuntimeError):
    """The server cannot take this request now (not the client's mistake): answer 503 with
    Retry-After; ``reason`` labels it in the metrics."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class BodyBudget:
    """Bytes of request bodies in memory, across all requests in flight, at most ``limit``."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise Unavailable(f"over capacity ({self.used:,} bytes of request bodies in memory, limit "
                              f"{self.limit:,}); retry shortly", "memory")
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0, "gave back more than was taken"


@contextlib.asynccontextmanager
async def read_body(chunks: AsyncIterable[bytes], declared: int | None, max_bytes: int, budget: BodyBudget,
                    deadline_s: float) -> AsyncIterator[bytes]:
    """The whole body, read within ``deadline_s`` and charged to ``budget`` until the block ends.

    ``declared`` (Content-Length) over ``max_bytes`` is refused before a byte is read (413); so is
    a body that turns out longer (chunked encoding). 408 when the client is too slow.
    """
    if declared is not None and declared > max_bytes:
        raise RequestError(f"body of {declared:,} bytes is over the limit of {max_bytes:,}", status=413)
    parts: list[bytes] = []
    held = 0
    try:
        try:
            async with asyncio.timeout(deadline_s):
                async for chunk in chunks:
                    if held + len(chunk) > max_bytes:
                        raise RequestError(f"body is over the limit of {max_bytes:,} bytes", status=413)
                    budget.take(len(chunk))
                    held += len(chunk)
                    parts.append(chunk)
        except TimeoutError:
            raise RequestError(f"the body did not arrive within {deadline_s:g} s "
                               f"({held:,} of {declared if declared is not None else '?'} bytes)",
                               status=408) from None
        body = b"".join(parts)
        parts.clear()
        yield body
    finally:
        budget.give(held)


# Content-Encoding -> zlib's wbits: a gzip member, or a zlib stream (what HTTP calls "deflate",
# and what tritonclient's request_compression_algorithm="deflate" sends, as Triton reads it)
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def content_encoding(header: str | None) -> str | None:
    """The body's encoding from its Content-Encoding header: None for none (or identity);
    one we cannot decode is refused with 415 before the body is read."""
    encoding = (header or "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding not in ENCODINGS:
        raise RequestError(f"Content-Encoding {header!r} is not supported; send the body as is, or compressed "
                           f"with one of {', '.join(ENCODINGS)}", status=415)
    return encoding


def inflate(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """A gzip or deflate body, decompressed to at most ``max_bytes``: a bomb (16 MiB of zeros is
    16 KB of gzip) is refused with 413 once its output passes the limit, never decompressed whole."""
    stream = zlib.decompressobj(ENCODINGS[encoding])
    try:
        out = stream.decompress(body, max_bytes + 1)  # stops there, whatever is left of the input
    except zlib.error as e:
        raise RequestError(f"the body is not valid {encoding} data ({e})") from None
    if len(out) > max_bytes:
        raise RequestError(f"the body decompressed is over the limit of {max_bytes:,} bytes "
                           f"({len(body):,} bytes of {encoding})", status=413)
    if not stream.eof:
        raise RequestError(f"the {encoding} body is cut short ({len(body):,} bytes)")
    if stream.unused_data:
        raise RequestError(f"{len(stream.unused_data):,} bytes follow the end of the {encoding} data")
    return out


class Slots:
    """At most ``limit`` inference requests queued or running; the rest are turned away at once."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self) -> None:
        if self.used >= self.limit:
            raise Unavailable(f"over capacity ({self.limit} inference requests queued or running); "
                              "retry shortly", "queue_full")
        self.used += 1

    def give(self) -> None:
        self.used -= 1
        assert self.used >= 0, "gave back more than was taken"
