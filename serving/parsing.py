"""Large request bodies are parsed in a worker process, so that the event loop keeps answering.

orjson parses a body in one call that holds the GIL from start to end (16 MiB of JSON numbers:
2 to 3 s on the 2-core test machine), so a thread would stall the event loop as much as parsing
on it did: while 64 such bodies arrived, a single-digit request's p99 was 3,103 ms, now 45 ms
(benchmarks.load --scenarios memory, docs/serving.md).
A process has a GIL of its own. A body whose JSON is at most ``inline_bytes`` (a single-digit
request is 5 KB and parses in 18 us) is parsed on the event loop, where it costs less than the
trip to the worker and back; a larger one goes to one worker process (``concurrent.futures``),
one body at a time. How many bodies wait for it is bounded by the body budget
(serving/admission.py); how much CPU parsing takes, by the worker: one core.

The worker is started with ``spawn`` (a fresh interpreter: nothing of the service's threads or
onnxruntime is forked into it) when the service starts, so the first large body does not pay
for it. If it dies (killed for memory, say), the request it was parsing is answered 503 and a
new worker takes the next one.
"""
from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from serving import admission, protocol

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def _worker_init(parent: int) -> None:
    """The worker's initializer. Ctrl-C reaches the whole process group, and only the service
    acts on it (it shuts the worker down itself); and the worker ends with the service, also one
    killed with SIGKILL, which would otherwise leave it behind (Linux; elsewhere it stays)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the service died before that took effect
            os._exit(0)


def _ready() -> bool:
    return True


class Parser:
    """``parse_infer`` on the event loop for small bodies, in the worker process for large ones."""

    def __init__(self, inline_bytes: int):
        self.inline_bytes = inline_bytes
        self._pool = self._start()

    @staticmethod
    def _start() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                   initargs=(os.getpid(),))

    async def warm_up(self) -> None:
        """Wait until the worker has started and can take a body."""
        await asyncio.wrap_future(self._pool.submit(_ready))

    async def parse(self, body: bytes, spec: protocol.ModelSpec, max_batch: int,
                    header_length: int | None = None) -> protocol.InferRequest:
        json_bytes = len(body) if header_length is None else header_length
        if json_bytes <= self.inline_bytes:
            return protocol.parse_infer(body, spec, max_batch, header_length)
        pool = self._pool
        try:
            return await asyncio.wrap_future(pool.submit(protocol.parse_infer, body, spec, max_batch, header_length))
        except BrokenProcessPool:
            if self._pool is pool:  # the first of the requests the dead worker held restarts it, once
                pool.shutdown(wait=False)
                self._pool = self._start()
            raise admission.Unavailable("the worker parsing large bodies stopped and was restarted; "
                                        "retry shortly", "parser") from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
