"""The service's JSON log lines: one object per line with the fields DESIGN §7 names, extras included."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import numpy as np

from srcid.service.logs import AccessLog, JsonFormatter


def _record(created: float, **extra) -> logging.LogRecord:
    record = logging.LogRecord("srcid.service.access", logging.INFO, __file__, 1, "request %s", ("done",), None)
    record.created, record.msecs = created, (created % 1) * 1000
    record.__dict__.update(extra)
    return record


def test_a_line_has_time_level_logger_message_and_the_extras():
    line = JsonFormatter().format(_record(1796131645.25, method="POST", status=200, ms=1.5,
                                          figures={"loss": np.float32(0.5), 3: np.arange(2)}))
    assert "\n" not in line
    out = json.loads(line)
    assert out == {"time": "2026-12-01T13:27:25.250Z", "level": "info", "logger": "srcid.service.access",
                   "message": "request done", "method": "POST", "status": 200, "ms": 1.5,
                   "figures": {"loss": 0.5, "3": [0, 1]}}


def test_each_line_gets_its_own_second_and_milliseconds():
    formatter = JsonFormatter()
    times = [json.loads(formatter.format(_record(t)))["time"] for t in (59.75, 60.125, 60.5, 3661.0)]
    assert times == ["1970-01-01T00:00:59.750Z", "1970-01-01T00:01:00.125Z", "1970-01-01T00:01:00.500Z",
                     "1970-01-01T01:01:01.000Z"]


def test_an_exception_is_kept_and_an_unknown_value_is_written_as_text():
    try:
        raise ValueError("broken")
    except ValueError:
        record = _record(0.0, thing=object())
        record.exc_info = sys.exc_info()
    out = json.loads(JsonFormatter().format(record))
    assert "ValueError: broken" in out["exception"] and out["thing"].startswith("<object object")


def test_building_the_formatter_stops_the_lookups_its_lines_leave_out():
    """Every process that formats these lines (each uvicorn worker builds its own formatter) skips them."""
    JsonFormatter()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("srcid.test_logs")
    logger.addHandler(handler)
    try:
        logger.warning("x")
    finally:
        logger.removeHandler(handler)
    (record,) = records
    assert record.thread is None and record.process is None and record.processName is None
    assert (record.pathname, record.lineno, record.funcName) == ("(unknown file)", 0, "(unknown function)")


class _Writes:
    """A stand-in for stderr that keeps each write."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


def test_the_access_log_writes_whole_lines_in_blocks_after_a_short_wait(monkeypatch):
    stderr = _Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    access = AccessLog()
    fields = {"method": "POST", "path": "/encode", "route": "/encode", "status": 200, "ms": 1.25}

    async def requests() -> list[int]:
        for _ in range(100):
            access.write(fields)
        written = [len(stderr.writes)]
        await asyncio.sleep(AccessLog.FLUSH_S * 3)  # no more requests: the rest go out on the timer
        return written + [len(stderr.writes)]

    before_wait, after_wait = asyncio.run(requests())
    assert 0 < before_wait < after_wait
    lines = "".join(stderr.writes).splitlines()
    assert len(lines) == 100 and all(w.endswith("\n") and len(w.encode()) <= AccessLog.BLOCK_BYTES for w in stderr.writes)
    line = json.loads(lines[0])
    # The line JsonFormatter writes for the same request, but for the time stamp.
    formatted = json.loads(JsonFormatter().format(_record(0.0, **fields)))
    assert {**line, "time": None} == {**formatted, "message": "request", "time": None}
    assert line["time"].endswith("Z") and len(line["time"]) == len("2026-12-01T13:27:25.250Z")


def test_the_access_log_flush_writes_what_waits_and_its_logger_level_turns_it_off(monkeypatch):
    stderr = _Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    access = AccessLog()

    async def one_request() -> None:
        access.write({"status": 200})
        access.flush()  # what the app does at shutdown

    asyncio.run(one_request())
    assert [json.loads(w)["status"] for w in stderr.writes] == [200]
    logger = logging.getLogger(AccessLog.NAME)
    level = logger.level
    try:
        logger.setLevel(logging.INFO)
        assert access.enabled()
        logger.setLevel(logging.WARNING)
        assert not access.enabled()
    finally:
        logger.setLevel(level)
