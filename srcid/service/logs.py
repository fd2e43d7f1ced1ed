"""Structured logs: one JSON object per line (time, level, logger, message, plus any `extra={"figures": ...}`)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import orjson

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


class Clock:
    """A line's time stamp, UTC to the millisecond, its seconds formatted once a second (11 vs 4 µs a line)."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")

    def stamp(self, created: float) -> str:
        second = int(created)
        if self._second[0] != second:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{self._second[1]}.{int((created - second) * 1000):03d}Z"


def json_line(stamp: str, level: str, logger: str, message: str, fields: dict[str, Any]) -> bytes:
    """One log line, without its newline: the fixed fields first, then `fields` (a record's extras)."""
    return orjson.dumps({"time": stamp, "level": level, "logger": logger, "message": message, **fields}, default=str,
                        option=_JSON_OPTIONS)


class JsonFormatter(logging.Formatter):
    """A record as one JSON line: time, level, logger, message and the record's extras, by orjson."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = Clock()
        # The lines leave out where a call was made from and its thread and process, so records need not look them
        # up (the logging HOWTO's "Optimization"): 25 vs 14 µs a line. Set here, where the lines are built,
        # so that every process formatting them gets it: uvicorn's worker processes build their own formatter.
        logging._srcfile = None
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json_line(self._clock.stamp(record.created), record.levelname.lower(), record.name,
                         record.getMessage(), fields).decode()


class AccessLog:
    """The line per request (logger `srcid.service.access` at INFO, which turns it on and off), the same `json_line`
    as JsonFormatter's, built and written without logging's machinery. On the event loop, logging a line (a
    LogRecord, the handler's lock, a write and a flush per line) cost ~35 µs a request under load, a fifth of a
    batched /encode (docs/PERFORMANCE.md, Serve). The lines go to stderr, as the other lines do, in blocks of whole
    lines of at most BLOCK_BYTES (one write each, atomic on a pipe: worker processes sharing stderr never cut into
    each other's lines): when a block is full, FLUSH_S after its first line, and at `flush()` on shutdown."""

    NAME = "srcid.service.access"
    BLOCK_BYTES = 4096  # PIPE_BUF on Linux
    FLUSH_S = 0.1

    def __init__(self) -> None:
        self._logger = logging.getLogger(self.NAME)
        self._clock = Clock()
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    def write(self, fields: dict[str, Any]) -> None:
        """One request's line (from the event loop); `fields` as a LogRecord's extras."""
        line = json_line(self._clock.stamp(time.time()), "info", self.NAME, "request", fields) + b"\n"
        if self._size + len(line) > self.BLOCK_BYTES:
            self.flush()
        self._lines.append(line)
        self._size += len(line)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            block, self._lines, self._size = b"".join(self._lines), [], 0
            sys.stderr.write(block.decode())
            sys.stderr.flush()


def configure(level: str, access_log: bool = True) -> dict[str, Any]:
    """Route the root, uvicorn and srcid loggers through JSON lines on stderr; returns uvicorn's log_config.
    Without `access_log`, the service's line per request is not written (nor built: its logger is not enabled)."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level.upper(), "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level.upper(), "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "srcid.service.access": {"level": level.upper() if access_log else "WARNING"},
        },
    }
