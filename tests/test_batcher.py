"""MicroBatcher on its own: batches form from what is queued, within max_batch and max_wait; a full queue refuses;
draining answers everything queued; errors fail one request or the whole batch; the batch function runs in the
batcher's own thread. And stack_rows, which builds the batch."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from srcid.service.batcher import MicroBatcher
from srcid.service.errors import NotReady, Overloaded
from srcid.service.media import stack_rows


class Recorder:
    """A batch function that records each call's payloads, optionally held until `release` is set."""

    def __init__(self, hold: bool = False):
        self.calls: list[list] = []
        self.threads: set[str] = set()
        self.release = threading.Event()
        self.started = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, payloads):
        self.threads.add(threading.current_thread().name)
        self.calls.append(list(payloads))
        self.started.set()
        self.release.wait(30)
        return [p * 10 if not isinstance(p, str) else ValueError(p) for p in payloads]


def batcher(run, **kw) -> MicroBatcher:
    options = {"max_batch": 8, "max_wait_ms": 50, "queue_size": 100, **kw}
    return MicroBatcher("test", run, **options)


async def started(b: MicroBatcher) -> MicroBatcher:
    b.start()
    return b


async def holding_the_first(run: Recorder, **options) -> tuple[MicroBatcher, asyncio.Future]:
    """A started batcher whose first batch, request 0 alone, is running and held until `run.release` is set."""
    b = await started(batcher(run, **options))
    first = b.enqueue(0)
    await asyncio.to_thread(run.started.wait, 10)
    return b, first


def test_requests_queued_while_a_batch_runs_form_the_next_batch_within_max_batch():
    run = Recorder(hold=True)

    async def go():
        b, first = await holding_the_first(run, max_batch=4)
        rest = [b.enqueue(i) for i in range(1, 10)]
        run.release.set()
        answers = await asyncio.gather(first, *rest)
        await b.drain()
        return answers

    answers = asyncio.run(go())
    assert answers == [i * 10 for i in range(10)]
    assert run.calls == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert run.threads == {"batcher-test"}


def test_a_batch_starts_while_the_event_loop_is_still_busy():
    """The batcher's thread takes a request without waiting for the event loop's turn: a burst of requests
    parsed in one turn no longer all lands in one batch while the encoder idles."""
    run = Recorder()

    async def go():
        b = await started(batcher(run))
        waiting = b.enqueue(1)
        deadline = time.perf_counter() + 5
        while not run.started.is_set() and time.perf_counter() < deadline:
            pass  # the event loop busy with Python, never yielding
        began = run.started.is_set()
        assert await waiting == 10
        await b.drain()
        return began

    assert asyncio.run(go())


def test_rows_count_against_max_batch_and_a_request_larger_than_it_runs_alone():
    run = Recorder(hold=True)

    async def go():
        b, first = await holding_the_first(run, max_batch=4)
        rest = [b.enqueue(1, rows=3), b.enqueue(2, rows=2), b.enqueue(3, rows=9), b.enqueue(4, rows=1)]
        run.release.set()
        await asyncio.gather(first, *rest)
        await b.drain()

    asyncio.run(go())
    assert run.calls == [[0], [1], [2], [3], [4]]


def test_a_lone_request_runs_at_once_but_a_batch_waits_for_requests_still_coming():
    run = Recorder()

    async def go():
        b = await started(batcher(run, max_wait_ms=2000))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await b.enqueue(1) == 10
        lone = loop.time() - t0
        with b.coming():  # a request still being decoded
            waiting = b.enqueue(2)
            await asyncio.sleep(0.2)
            late = b.enqueue(3)
        answers = await asyncio.gather(waiting, late)
        await b.drain()
        return lone, answers

    lone, answers = asyncio.run(go())
    assert lone < 1.0  # far below max_wait: nothing was coming
    assert answers == [20, 30]
    assert run.calls == [[1], [2, 3]]


def test_a_full_queue_refuses_with_overloaded():
    run = Recorder(hold=True)

    async def go():
        b, first = await holding_the_first(run, queue_size=2)
        queued = [b.enqueue(1), b.enqueue(2)]
        with pytest.raises(Overloaded):
            b.enqueue(3)
        run.release.set()
        answers = await asyncio.gather(first, *queued)
        await b.drain()
        return answers

    assert asyncio.run(go()) == [0, 10, 20]


def test_drain_answers_everything_queued_then_refuses_new_requests():
    run = Recorder(hold=True)

    async def go():
        b, first = await holding_the_first(run, max_batch=2)
        queued = [b.enqueue(i) for i in range(1, 6)]
        draining = asyncio.ensure_future(b.drain())
        await asyncio.sleep(0.05)
        with pytest.raises(NotReady):
            b.enqueue(99)
        run.release.set()
        await draining
        assert all(f.done() for f in queued)  # answered before drain returned
        return await asyncio.gather(first, *queued)

    assert asyncio.run(go()) == [0, 10, 20, 30, 40, 50]


def test_a_result_that_is_an_exception_fails_only_its_request_and_a_raising_batch_fails_all():
    def failing(payloads):
        if 13 in payloads:
            raise RuntimeError("batch broke")
        return Recorder()(payloads)

    async def go():
        b = await started(batcher(failing))
        ok, bad = await asyncio.gather(b.enqueue(1), b.enqueue("only me"), return_exceptions=True)
        both = await asyncio.gather(b.enqueue(13), return_exceptions=True)
        await b.drain()
        return ok, bad, both

    ok, bad, both = asyncio.run(go())
    assert ok == 10 and isinstance(bad, ValueError) and str(bad) == "only me"
    assert isinstance(both[0], RuntimeError)


def test_a_cancelled_request_is_left_out_of_its_batch():
    run = Recorder(hold=True)

    async def go():
        b, first = await holding_the_first(run)
        gone, kept = b.enqueue(1), b.enqueue(2)
        gone.cancel()
        run.release.set()
        answers = await asyncio.gather(first, kept)
        await b.drain()
        return answers

    assert asyncio.run(go()) == [0, 20]
    assert run.calls == [[0], [2]]


def test_the_initializer_runs_in_the_batcher_thread_before_any_batch():
    seen: list[str] = []

    async def go():
        b = MicroBatcher("init", lambda p: [threading.current_thread().name for _ in p], 8, 5, 10,
                         initializer=lambda: seen.append(threading.current_thread().name))
        b.start()
        name = await b.enqueue(None)
        await b.drain()
        return name

    assert asyncio.run(go()) == "batcher-init" and seen == ["batcher-init"]


def test_stack_rows_equals_concatenate_and_is_writable():
    rng = np.random.default_rng(0)
    rows = [np.ascontiguousarray(rng.standard_normal((1, 10, 6), dtype=np.float32)) for _ in range(5)]
    stacked = stack_rows(rows)
    assert stacked.dtype == np.float32 and stacked.shape == (5, 10, 6) and stacked.flags.writeable
    np.testing.assert_array_equal(stacked, np.concatenate(rows))
    masks = [np.ones((1, 10), bool), np.zeros((1, 10), bool), np.eye(1, 10, 3, dtype=bool)]
    np.testing.assert_array_equal(stack_rows(masks), np.concatenate(masks))
    assert stack_rows(rows[:1]) is rows[0]


def test_a_failing_metrics_hook_or_initializer_fails_the_batch_not_the_thread():
    """Every queued request still gets an answer: the thread outlives a hook that raises."""
    calls = []

    def broken_hook(rows: int) -> None:
        calls.append(rows)
        if len(calls) == 1:
            raise RuntimeError("metrics broke")

    def broken_init() -> None:
        raise OSError("no threads to set")

    async def go():
        b = MicroBatcher("hooks", Recorder(), 8, 5, 10, initializer=broken_init, on_batch=broken_hook)
        b.start()
        first = await asyncio.gather(b.enqueue(1), return_exceptions=True)
        second = await b.enqueue(2)
        await b.drain()
        return first[0], second

    failed, answered = asyncio.run(go())
    assert isinstance(failed, RuntimeError) and answered == 20
