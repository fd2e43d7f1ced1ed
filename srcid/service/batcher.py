"""Dynamic micro-batching: concurrent requests gathered into one call of a batch function.

A request (one or more rows) waits in a bounded queue. Each batcher has its own thread: it takes the first waiting
request, then keeps taking requests until the batch holds `max_batch` rows or `max_wait_ms` has passed since it
took the first (it waits only while requests announced with `coming()` are still on their way, so a lone request
runs at once), calls the batch function once, and hands each request its own rows on the event loop. A full queue
refuses at once (`Overloaded`, HTTP 429) rather than letting latency grow without bound.

Why a thread of its own rather than a task on the event loop: a burst of requests (a closed loop of clients that
all got their answers from the last batch) is parsed in one turn of the event loop, and a task would only see the
queue after all of it, so every batch held the whole burst and the encoder sat idle while the loop parsed the next
one. A thread takes what has arrived as soon as the interpreter lets it, and encodes it while the loop parses the
rest (docs/PERFORMANCE.md, Serve).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
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
    queued_at: float = 0.0  # time.perf_counter() at enqueue


class MicroBatcher(Generic[P, R]):
    """`run(payloads) -> results` (one result per payload, same order; an Exception as a result fails that request
    alone) is called in the batcher's thread with up to `max_batch` rows; `initializer()` runs first in that thread.

    `on_batch(rows)` and `on_depth(depth)` report batch sizes and queue depth, `on_wait(seconds)` each request's
    wait from enqueue to the start of its batch and `on_run(seconds)` each batch's call (metrics)."""

    def __init__(
        self,
        name: str,
        run: Callable[[Sequence[P]], Sequence[R]],
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        initializer: Callable[[], None] = lambda: None,
        on_batch: Callable[[int], None] = lambda rows: None,
        on_depth: Callable[[int], None] = lambda depth: None,
        on_wait: Callable[[float], None] = lambda seconds: None,
        on_run: Callable[[float], None] = lambda seconds: None,
    ):
        self.name = name
        self._run, self._initializer = run, initializer
        self.max_batch, self.max_wait, self.queue_size = max_batch, max_wait_ms / 1000.0, queue_size
        self._on_batch, self._on_depth, self._on_wait, self._on_run = on_batch, on_depth, on_wait, on_run
        self._pending: deque[_Pending] = deque()
        self._changed = threading.Condition()  # guards _pending, _coming and _closing
        self._coming = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @contextlib.contextmanager
    def coming(self):
        """Wrap the work (decoding, say) between a request's arrival and its `enqueue`, so that a batch being
        gathered waits for it; with nothing coming, a batch runs without waiting."""
        with self._changed:
            self._coming += 1
        try:
            yield
        finally:
            with self._changed:
                self._coming -= 1
                if self._coming == 0:
                    self._changed.notify()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name=f"batcher-{self.name}", daemon=True)
        self._thread.start()

    def enqueue(self, payload: P, rows: int = 1) -> asyncio.Future:
        """Queue a request (from the event loop); the future gets its result. Raises Overloaded when the queue is
        full, NotReady once draining."""
        if self._loop is None:
            raise NotReady(f"{self.name}: the service is not started")
        future = self._loop.create_future()
        with self._changed:
            if self._closing:
                raise NotReady(f"{self.name}: the service is shutting down")
            if len(self._pending) >= self.queue_size:
                raise Overloaded(f"{self.name}: {self.queue_size} requests already waiting; retry later")
            self._pending.append(_Pending(payload, rows, future, time.perf_counter()))
            depth = len(self._pending)
            self._changed.notify()
        self._on_depth(depth)
        return future

    async def drain(self) -> None:
        """Stop taking requests, answer every queued one, then stop the thread."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            # The answers were handed to the loop before the thread ended; they run before this coroutine resumes.
            await asyncio.sleep(0)

    def _gather(self) -> list[_Pending] | None:
        """The next batch, or None once draining with nothing left (in the batcher's thread)."""
        with self._changed:
            while not self._pending:
                if self._closing:
                    return None
                self._changed.wait()
            first = self._pending.popleft()
            batch, rows = [first], first.rows
            deadline = time.perf_counter() + self.max_wait
            while rows < self.max_batch:
                if self._pending:
                    if rows + self._pending[0].rows > self.max_batch:
                        break  # it starts the next batch, so no batch exceeds max_batch unless one request does
                    item = self._pending.popleft()
                    batch.append(item)
                    rows += item.rows
                    continue
                left = deadline - time.perf_counter()
                if self._coming == 0 or self._closing or left <= 0:
                    break
                self._changed.wait(left)
            depth = len(self._pending)
        self._on_depth(depth)
        return batch

    def _work(self) -> None:
        try:
            self._initializer()
        except Exception:  # noqa: BLE001 - the batches still run, with the thread's defaults
            log.exception("%s: the batcher thread's initializer failed", self.name)
        while (batch := self._gather()) is not None:
            live = [p for p in batch if not p.future.done()]  # a client that went away cancelled its future
            if not live:
                continue
            started = time.perf_counter()
            try:
                self._on_batch(sum(p.rows for p in live))
                for p in live:
                    self._on_wait(started - p.queued_at)
                results: Sequence[R] | Exception = self._run([p.payload for p in live])
                self._on_run(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - every waiting request must get an answer
                if isinstance(exc, ValueError):  # an error with a status for the client (catalog down, say)
                    log.warning("%s: batch of %d requests failed: %s", self.name, len(live), exc)
                else:
                    log.exception("%s: batch of %d requests failed", self.name, len(live))
                results = exc
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(_answer, live, results)
            except RuntimeError:  # the loop is closed: nobody is left to answer
                return


def _answer(batch: list[_Pending], results: Sequence | Exception) -> None:
    """On the event loop: each request's result, its own error, or the whole batch's error."""
    for i, p in enumerate(batch):
        if p.future.done():
            continue
        result = results if isinstance(results, Exception) else results[i]
        if isinstance(result, Exception):
            p.future.set_exception(result)
        else:
            p.future.set_result(result)
