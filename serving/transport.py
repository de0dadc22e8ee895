"""What the service adds to uvicorn's HTTP/1.1 (with h11): limits that hold however the bytes
arrive, and counts of the requests that never reach the app.

uvicorn with h11 refuses malformed requests by itself (a 400, the connection closed), but three
things it does not do, measured against it (benchmarks/http_servers.py):

- h11's limit on a request's head (16 KiB) applies only while the head is incomplete, so a
  head sent in one write was parsed whole: 10,000 headers (97 KiB) were answered 200, at
  28.5 - 35 ms of CPU each (0.5 ms once refused here). ``GuardedH11`` looks at a head before h11
  parses it and refuses one over ``MAX_HEAD_BYTES`` or ``MAX_HEADERS`` with 431.
- A request with both Content-Length and Transfer-Encoding was answered per Transfer-Encoding
  and the connection kept open; behind a proxy that trusts Content-Length, the rest of the
  body is the proxy's next request (request smuggling). RFC 9112 section 6.1 lets a server
  refuse such a request and requires it to close the connection after answering;
  ``refuse_ambiguous_framing`` does both, before the app sees the request.
- What h11 refuses never reaches the app, so the app's request counter never saw it: each
  refusal here and each of h11's is counted (``Metrics.refused``), and the connections open
  now are a gauge, so a flood of broken requests or a slow-loris attack shows on a dashboard.

Every refusal at this level is a JSON error (as the app's are), and the connection is closed
the way nginx's lingering close does it, so that the client gets to read the answer.

``GuardedH11`` is a subclass of uvicorn's own protocol (``uvicorn.Config(http=...)`` takes one),
overriding a few of its methods; tests/test_serve.py checks each behaviour over real sockets.
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import orjson
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from serving.metrics import Metrics

MAX_HEAD_BYTES = 16 * 1024  # a request line and its headers: h11's own limit for an incomplete head
MAX_HEADERS = 100  # header fields in one request (Apache httpd's LimitRequestFields); a client sends a dozen
LINGER_S = 2.0  # a refused connection is closed once the client closes its end, or after this
# where a head ends, as h11 finds it: lines may end in a bare LF (RFC 9112 2.2 lets a server accept that)
BLANK_LINE = re.compile(rb"\n\r?\n")


def head_problem(pending: bytes, max_bytes: int = MAX_HEAD_BYTES, max_headers: int = MAX_HEADERS) -> str | None:
    """Why the request head at the start of ``pending`` must be refused, or None: it is within
    the limits, or not all there yet and still under ``max_bytes`` (h11 refuses it if it grows)."""
    blank = BLANK_LINE.search(pending, 0, max_bytes + 4)
    if blank is None:
        return f"request head over {max_bytes:,} bytes" if len(pending) > max_bytes else None
    end = blank.start()
    fields = pending.count(b"\n", 0, end)  # the request line's end, then one per header but the last
    if fields > max_headers:
        return f"{fields:,} header fields; at most {max_headers}"
    return None


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def guarded_h11(metrics: Metrics) -> type[H11Protocol]:
    """uvicorn's h11 protocol, counting what it refuses into ``metrics`` and refusing request
    heads over the limits before h11 parses them."""

    class GuardedH11(H11Protocol):
        refusing = False  # a refusal was sent: what the client still sends is read and dropped

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            metrics.open_connections.inc()
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            metrics.open_connections.dec()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self.refusing:
                super().data_received(data)

        def handle_events(self) -> None:
            # Only before a request's head is parsed (their_state IDLE: a new connection, or the
            # next request on a kept-alive one) is there a head in h11's buffer to look at.
            if self.conn.their_state is h11.IDLE:
                pending, _ = self.conn.trailing_data
                if problem := head_problem(pending):
                    self.refuse(431, "headers_too_large", problem)
                    return
            super().handle_events()

        def send_400_response(self, msg: str) -> None:  # uvicorn's answer to anything h11 can't parse
            self.refuse(400, "malformed", f"invalid HTTP request: {msg}")

        def refuse(self, status: int, reason: str, message: str) -> None:
            """Answer ``status`` with a JSON error and close the connection, lingering: closing a
            socket with unread bytes sends a reset, which can destroy the answer before the client
            reads it, so the client's remaining bytes are read and dropped for up to LINGER_S."""
            metrics.refused(reason)
            if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):  # an answer is under way: cut it
                self.transport.close()
                return
            body = error_body(message)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            self.transport.write(b"".join(self.conn.send(event) for event in (
                h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
                h11.Data(data=body), h11.EndOfMessage())))
            self.refusing = True
            self.transport.write_eof()  # the answer, then FIN; a client that reads it closes its end
            self.transport.resume_reading()
            self.loop.call_later(LINGER_S, self.transport.close)

    return GuardedH11


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def refuse_ambiguous_framing(app: Any, metrics: Metrics) -> ASGIApp:
    """``app``, behind a check of each request's framing: one with both Content-Length and
    Transfer-Encoding is answered 400 and its connection closed (RFC 9112, section 6.1)."""
    async def guarded(scope: dict, receive: Callable[[], Awaitable[dict]],
                      send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] == "http":
            names = {name for name, _ in scope["headers"]}  # lower case, as the ASGI spec has them
            if b"content-length" in names and b"transfer-encoding" in names:
                metrics.refused("ambiguous_framing")
                body = error_body("the request has both Content-Length and Transfer-Encoding; send one "
                                  "(RFC 9112, section 6.1)")
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)
    return guarded
