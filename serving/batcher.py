"""Joins the inference requests that queue up while the model runs into one onnxruntime run."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_Job = tuple[np.ndarray, "asyncio.Future[np.ndarray]", float]  # input, its answer, when it was queued


class Batcher:
    """Runs ``run`` on one thread, joining the requests queued meanwhile into one batch.

    While onnxruntime runs a batch (without the GIL), the event loop keeps reading and parsing
    requests; they queue up and become the next batch. Create it on the running loop.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int, delay_s: float = 0.0,
                 on_batch: Callable[[int, float, float], None] | None = None):
        self._run, self._max, self._delay = run, max_batch, delay_s
        self._on_batch = on_batch or (lambda images, seconds, waited: None)
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._carry: _Job | None = None  # a job that did not fit the last batch
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")
        self.runs = self.images = 0
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits for ``x`` (N, ...), once its batch has run."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((x, future, time.perf_counter()))
        return await future

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await asyncio.to_thread(self._thread.shutdown)  # a run in progress finishes first

    async def _collect(self) -> list[_Job]:
        first = self._carry or await self._queue.get()
        self._carry = None
        jobs, n = [first], len(first[0])
        if self._delay and n < self._max:
            await asyncio.sleep(self._delay)  # let more requests arrive
        while n < self._max and not self._queue.empty():
            job = self._queue.get_nowait()
            if n + len(job[0]) > self._max:
                self._carry = job  # the first of the next batch
                break
            jobs.append(job)
            n += len(job[0])
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            images = sum(len(j[0]) for j in jobs)
            t0 = time.perf_counter()
            try:
                x = jobs[0][0] if len(jobs) == 1 else np.concatenate([j[0] for j in jobs])
                y = await loop.run_in_executor(self._thread, self._run, x)
            except Exception as e:  # noqa: BLE001 - handed to every waiting request, never lost
                for _, future, _ in jobs:
                    if not future.done():  # a request cancelled meanwhile no longer waits
                        future.set_exception(e)
            else:
                start = 0
                for j, future, _ in jobs:
                    if not future.done():
                        future.set_result(y[start:start + len(j)])
                    start += len(j)
            self.runs, self.images = self.runs + 1, self.images + images
            self._on_batch(images, time.perf_counter() - t0, sum(t0 - queued for _, _, queued in jobs))


