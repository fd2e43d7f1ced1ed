"""The app factory: `create_app(settings)` wires routers, error handlers, the body limit, metrics and access logs."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from srcid import __version__

from .errors import error_response, error_response_for, install_error_handlers
from .logs import AccessLog
from .routers import encode, health, items, retrieve
from .routing import JSONBodyRoute
from .settings import Settings
from .state import ServiceState

JSON_HEADERS = [(b"content-type", b"application/json")]


class Guard:
    """Pure ASGI middleware: refuses bodies over `max_body_bytes` with 413 before any JSON parsing (by
    Content-Length, or while reading a chunked body), and records each request's route, status and latency.

    A POST to one of the `direct` routes (/encode, /retrieve) is answered here by the route itself, without the
    Starlette/FastAPI middleware, routing and request layers in between: they cost ~0.15 ms of the event loop's
    time a request, as much as the rest of a batched /encode (docs/PERFORMANCE.md, Serve). Its errors get the
    answers the app's error handlers give."""

    def __init__(self, app: ASGIApp, state: ServiceState, direct: dict[str, JSONBodyRoute], access: AccessLog):
        self.app, self.state, self.direct, self.access = app, state, direct, access

    async def _read_body(self, receive: Receive, limit: int) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        limit = self.state.settings.max_body_bytes

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers", []))
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await _too_large(limit)(scope, receive, send_recording)
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(receive, limit)
                if body is None:
                    await _too_large(limit)(scope, receive, send_recording)
                    return
                route = self.direct.get(scope["path"]) if scope["method"] == "POST" and not scope.get("root_path") else None
                if route is None:
                    _as_json(scope)
                    await self.app(scope, _replaying(body, receive), send_recording)
                    return
                scope["route"] = route
                status_code, answer_headers, answer = await self.direct_answer(route, body)
                await send_recording({"type": "http.response.start", "status": status_code, "headers": answer_headers})
                await send_recording({"type": "http.response.body", "body": answer})
            else:
                await self.app(scope, receive, send_recording)
        finally:
            route = scope.get("route")
            self.record(scope["method"], scope["path"], getattr(route, "path", "unmatched"), status["code"],
                        time.perf_counter() - start)

    async def direct_answer(self, route: JSONBodyRoute, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """A direct route's answer to a request body: status, headers and body, an error as the app's error handlers
        answer it. Also what srcid.service.protocol's uvicorn protocol answers these routes with."""
        try:
            answer = await route.answer(self.state, body)
        except Exception as exc:  # noqa: BLE001 - answered as the app's error handlers answer it
            response = error_response_for(exc)
            return response.status_code, response.raw_headers, bytes(response.body)
        return 200, [*JSON_HEADERS, (b"content-length", b"%d" % len(answer))], answer

    def record(self, method: str, path: str, route: str, status: int, seconds: float) -> None:
        """A request's metrics and access line."""
        self.state.metrics.request_done(route, method, status, seconds)
        if self.access.enabled():
            self.access.write({"method": method, "path": path, "route": route, "status": status,
                               "ms": round(seconds * 1000, 2)})


def _too_large(limit: int) -> Response:
    return error_response(413, "body_too_large", f"request body larger than {limit} bytes (SRCID_MAX_BODY_BYTES)")


def _replaying(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app behind Guard, which has read the whole body already: the body once, then the client's
    own messages (a disconnect)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _as_json(scope: Scope) -> None:
    """Every body this API takes is JSON: treat a body sent without a content type, or as a form (what
    `curl -d` sends by default), as JSON instead of refusing it."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
    kind = dict(scope.get("headers", [])).get(b"content-type", b"")
    if not kind or kind.startswith(b"application/x-www-form-urlencoded"):
        scope["headers"] = [*headers, (b"content-type", b"application/json")]


class ServiceApp(FastAPI):
    """FastAPI with `Guard` as its outermost layer, outside even the error, telemetry and body-limit middleware
    FastAPI puts first: the point of Guard's direct routes is to skip those layers too."""

    def put_guard_in_front(self, state: ServiceState, routes: list[BaseRoute], access: AccessLog) -> None:
        """Guard answers POSTs to the JSONBodyRoutes among `routes` (included without a prefix) itself."""
        direct = {r.path: r for r in routes if isinstance(r, JSONBodyRoute) and "POST" in r.methods}
        self.guard = Guard(super().__call__, state, direct, access)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.guard(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for `settings` (default: from the environment). Loading starts with the server (lifespan)."""
    settings = settings or Settings()
    state = ServiceState(settings)
    access = AccessLog()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            try:
                await state.stop()
            finally:
                access.flush()

    app = ServiceApp(
        title="srcid",
        version=__version__,
        description="One discrete vocabulary for audio, video and text: /encode turns media into two layers of "
        "codebook indices per time step; /retrieve searches the catalog across modalities.",
        lifespan=lifespan,
    )
    app.state.service = state
    install_error_handlers(app)
    routers = (encode.router, retrieve.router, items.router, health.router)
    for router in routers:
        app.include_router(router)
    app.put_guard_in_front(state, [route for router in routers for route in router.routes], access)
    return app
