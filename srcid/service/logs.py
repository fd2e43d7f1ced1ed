"""Structured logs: one JSON object per line (time, level, logger, message, plus any `extra={"figures": ...}`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


class JsonFormatter(logging.Formatter):
    """The service writes an access line per request from its event loop, so a line costs little: orjson, and the
    time stamp's seconds formatted once a second (11 vs 4 µs a line, docs/PERFORMANCE.md)."""

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")
        # The lines leave out where a call was made from and its thread and process, so records need not look them
        # up (the logging HOWTO's "Optimization"): 25 vs 14 µs an access line. Set here, where the lines are built,
        # so that every process formatting them gets it: uvicorn's worker processes build their own formatter.
        logging._srcfile = None
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if self._second[0] != second:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        out: dict[str, Any] = {
            "time": f"{self._second[1]}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str, option=_JSON_OPTIONS).decode()


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
