"""The service's JSON log lines: one object per line with the fields DESIGN §7 names, extras included."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np

from srcid.service.logs import JsonFormatter


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
