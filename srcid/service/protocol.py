"""The HTTP/1.1 protocol `srcid serve` gives uvicorn: uvicorn's own httptools protocol, except that a POST to one of
Guard's direct routes (/encode, /retrieve) is answered by Guard's `direct_answer` without an ASGI request cycle.

Under load, the event loop is what limits a batched /encode server, and about 30 % of its time (py-spy's samples;
docs/PERFORMANCE.md, Serve, twenty-first session) went to uvicorn's ASGI cycle and the layers in front of Guard: an
asyncio.Event, a scope and a task per request, ProxyHeadersMiddleware, `receive` and two `send` calls with their
header checks, and two writes to the socket. A `DirectCycle` stands where uvicorn's `RequestResponseCycle` would, so
uvicorn's own keep-alive, pipelining, flow control, shutdown and disconnect handling run unchanged around it; it
takes the body as uvicorn hands it over, awaits Guard's answer and writes it in one piece. Requests it cannot answer
so exactly go through the ASGI app as before: any other method or path (a query string included), a body without
Content-Length, or chunked, or larger than SRCID_MAX_BODY_BYTES, `Expect: 100-continue`, an upgrade, a root path,
uvicorn's --limit-concurrency.

This subclasses uvicorn's `HttpToolsProtocol` (uvicorn.protocols.http.httptools_impl, not a documented API):
tests/test_service_protocol.py checks, on the uvicorn installed, that both ways give the same answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .app import Guard, ServiceApp
from .routing import JSONBodyRoute

log = logging.getLogger(__name__)


def _guard_of(app: Any) -> Guard | None:
    """The Guard of the ServiceApp inside uvicorn's loaded app (wrapped in ProxyHeadersMiddleware and the like)."""
    while not isinstance(app, ServiceApp):
        app = getattr(app, "app", None)
        if app is None:
            return None
    return app.guard


class DirectCycle:
    """One request to a direct route, in the place of uvicorn's RequestResponseCycle: the attributes uvicorn's
    protocol reads and writes (`body`, `more_body`, `message_event`, `keep_alive`, `disconnected`,
    `response_complete`) and `run_asgi`, which uvicorn starts as the request's task, at once or once the requests
    before it on the connection are answered."""

    def __init__(self, protocol: DirectHttpProtocol, guard: Guard, route: JSONBodyRoute, keep_alive: bool):
        self.protocol, self.guard, self.route = protocol, guard, route
        self.started = time.perf_counter()
        self.body = bytearray()
        self.more_body = True
        self.message_event = asyncio.Event()
        self.keep_alive = keep_alive
        self.disconnected = False
        self.response_complete = False

    async def run_asgi(self, app: Any) -> None:
        """Answer the request (`app`, uvicorn's ASGI app, is not needed: Guard answers). A request left unanswered
        (its client gone, an error writing, a task cancelled at the end of a shutdown) closes the connection: the
        answers after it on a keep-alive connection would be taken for its own."""
        protocol = self.protocol
        answered = False
        try:
            while self.more_body and not self.disconnected:
                protocol.flow.resume_reading()  # uvicorn pauses reading past 64 KiB until the body is taken
                await self.message_event.wait()
                self.message_event.clear()
            if self.disconnected:
                return
            status, headers, body = await self.guard.direct_answer(self.route, bytes(self.body))
            if self.disconnected or protocol.transport.is_closing():
                return
            head = [STATUS_LINE[status]]
            for name, value in (*protocol.server_state.default_headers, *headers):
                head += (name, b": ", value, b"\r\n")
            if not self.keep_alive:
                head.append(b"connection: close\r\n")
            head += (b"\r\n", body)
            protocol.transport.write(b"".join(head))
            answered = True
            self.guard.record("POST", self.route.path, self.route.path, status, time.perf_counter() - self.started)
        except Exception:  # noqa: BLE001 - logged here; the connection is closed below
            log.exception("POST %s: no answer could be written; closing the connection", self.route.path)
        finally:
            self.response_complete = True
            self.message_event.set()
            if not (answered and self.keep_alive):
                protocol.transport.close()
            if not self.disconnected:
                protocol.on_response_complete()


class DirectHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with DirectCycle for the requests Guard answers itself (the module docstring);
    uvicorn.run(app, http=DirectHttpProtocol)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.guard = _guard_of(self.app)

    def _direct_route(self) -> JSONBodyRoute | None:
        guard = self.guard
        if (guard is None or self.parser.get_method() != b"POST" or self.expect_100_continue or self.root_path
                or self.limit_concurrency is not None or self.parser.should_upgrade()):
            return None
        route = guard.direct.get(self.url.decode("latin-1"))
        if route is None:
            return None
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                if length is not None:
                    return None
                length = value
            elif name == b"transfer-encoding":
                return None
        if length is None or not length.isdigit() or int(length) > guard.state.settings.max_body_bytes:
            return None
        return route

    def on_headers_complete(self) -> None:
        route = self._direct_route()
        if route is None:
            super().on_headers_complete()
            return
        assert self.guard is not None
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        existing, self.cycle = self.cycle, DirectCycle(self, self.guard, route, keep_alive)  # type: ignore[assignment]
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, self.app)  # type: ignore[arg-type]
        else:  # pipelined: it starts when the request before it is answered, as uvicorn's own cycles do
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))  # type: ignore[arg-type]
