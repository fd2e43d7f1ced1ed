"""Dynamic micro-batching: concurrent requests gathered into one call of a batch function.

A request (one or more rows) waits in a bounded queue; a worker takes the first waiting request, then keeps
taking requests until the batch holds `max_batch` rows or `max_wait_ms` has passed since the first arrived (it
waits only while requests announced with `coming()` are still on their way, so a lone request runs at once), runs
the batch function once in an executor (so the event loop stays free), and hands each request its own rows. A
full queue refuses at once (`Overloaded`, HTTP 429) rather than letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

from .errors import NotReady, Overloaded

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")


@dataclass
class _Pending(Generic[P, R]):
    payload: P
    rows: int
    future: asyncio.Future = field(repr=False)
    queued_at: float = 0.0  # event-loop time of enqueue


class MicroBatcher(Generic[P, R]):
    """`run(payloads) -> results` (one result per payload, same order; an Exception as a result fails that request
    alone) is called with up to `max_batch` rows.

    `on_batch(rows)` and `on_depth(depth)` report batch sizes and queue depth, `on_wait(seconds)` each request's
    wait from enqueue to the start of its batch and `on_run(seconds)` each batch's call (metrics)."""

    def __init__(
        self,
        name: str,
        run: Callable[[Sequence[P]], Sequence[R]],
        executor: Executor,
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        on_batch: Callable[[int], None] = lambda rows: None,
        on_depth: Callable[[int], None] = lambda depth: None,
        on_wait: Callable[[float], None] = lambda seconds: None,
        on_run: Callable[[float], None] = lambda seconds: None,
    ):
        self.name = name
        self._run, self._executor = run, executor
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue(maxsize=queue_size)
        self._on_batch, self._on_depth, self._on_wait, self._on_run = on_batch, on_depth, on_wait, on_run
        self._held: _Pending | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._coming = 0

    @contextlib.contextmanager
    def coming(self):
        """Wrap the work (decoding, say) between a request's arrival and its `enqueue`, so that a batch being
        gathered waits for it; with nothing coming, a batch runs without waiting."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")

    async def submit(self, payload: P, rows: int = 1) -> R:
        return await self.enqueue(payload, rows)

    def enqueue(self, payload: P, rows: int = 1) -> asyncio.Future:
        """Queue a request; the future gets its result. Raises Overloaded when the queue is full."""
        if self._closing or self._task is None:
            raise NotReady(f"{self.name}: the service is shutting down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            self._queue.put_nowait(_Pending(payload, rows, future, loop.time()))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.name}: {self._queue.maxsize} requests already waiting; retry later") from None
        self._on_depth(self._queue.qsize())
        return future

    async def drain(self) -> None:
        """Stop taking requests, answer every queued one, then stop the worker."""
        self._closing = True
        if self._task is None:
            return
        await self._queue.put(None)
        await self._task

    async def _next(self, timeout: float | None) -> _Pending | None:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """A batch starting with `first`; the flag says the stop sentinel was met."""
        loop = asyncio.get_running_loop()
        batch, rows = [first], first.rows
        deadline = loop.time() + self.max_wait
        while rows < self.max_batch:
            if self._queue.empty() and self._coming == 0:
                break
            try:
                item = await self._next(deadline - loop.time())
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if item is None:
                return batch, True
            if rows + item.rows > self.max_batch:
                self._held = item  # starts the next batch, so no batch exceeds max_batch unless one request does
                break
            batch.append(item)
            rows += item.rows
        return batch, False

    def _timed_run(self, payloads: list[P]) -> tuple[Sequence[R], float]:
        """The batch function and its duration in its own thread (the event loop's delay in resuming is not in it)."""
        start = time.perf_counter()
        results = self._run(payloads)
        return results, time.perf_counter() - start

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not (stopping and self._held is None):
            # Requests queued before drain() put the sentinel come before it, so after it only `_held` remains.
            first = await self._next(None)
            if first is None:
                stopping = True
                continue
            batch, stopping_now = await self._gather(first)
            stopping = stopping or stopping_now
            self._on_depth(self._queue.qsize())
            live = [p for p in batch if not p.future.done()]  # a client that went away cancelled its future
            if not live:
                continue
            self._on_batch(sum(p.rows for p in live))
            started = loop.time()
            for p in live:
                self._on_wait(started - p.queued_at)
            try:
                results, seconds = await loop.run_in_executor(self._executor, self._timed_run, [p.payload for p in live])
                self._on_run(seconds)
            except Exception as exc:  # noqa: BLE001 - every waiting request must get an answer
                if isinstance(exc, ValueError):  # an error with a status for the client (catalog down, say)
                    log.warning("%s: batch of %d requests failed: %s", self.name, len(live), exc)
                else:
                    log.exception("%s: batch of %d requests failed", self.name, len(live))
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, result in zip(live, results):
                if p.future.done():
                    continue
                if isinstance(result, Exception):  # this request's own error; the others of the batch went on
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)
