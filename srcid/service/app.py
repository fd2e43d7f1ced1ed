"""The app factory: `create_app(settings)` wires routers, error handlers, the body limit, metrics and access logs."""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from srcid import __version__

from .errors import error_body, install_error_handlers
from .routers import encode, health, items, retrieve
from .settings import Settings
from .state import ServiceState

log = logging.getLogger("srcid.service.access")


class Guard:
    """Pure ASGI middleware: refuses bodies over `max_body_bytes` with 413 before any JSON parsing (by
    Content-Length, or while reading a chunked body), and records each request's route, status and latency."""

    def __init__(self, app: ASGIApp, state: ServiceState):
        self.app, self.state = app, state

    async def _reject(self, send: Send, status: int, code: str, message: str) -> None:
        body = json.dumps(error_body(code, message)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

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
        too_large = f"request body larger than {limit} bytes (SRCID_MAX_BODY_BYTES)"

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers", []))
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await self._reject(send_recording, 413, "body_too_large", too_large)
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(receive, limit)
                if body is None:
                    await self._reject(send_recording, 413, "body_too_large", too_large)
                    return
                delivered = False
                _as_json(scope)

                async def replay() -> Message:
                    nonlocal delivered
                    if not delivered:
                        delivered = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_recording)
            else:
                await self.app(scope, receive, send_recording)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - start
            m = self.state.metrics
            m.requests.labels(path, scope["method"], str(status["code"])).inc()
            m.latency.labels(path, scope["method"]).observe(elapsed)
            log.info("request", extra={"method": scope["method"], "path": scope["path"], "route": path,
                                       "status": status["code"], "ms": round(elapsed * 1000, 2)})


def _as_json(scope: Scope) -> None:
    """Every body this API takes is JSON: treat a body sent without a content type, or as a form (what
    `curl -d` sends by default), as JSON instead of refusing it."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
    kind = dict(scope.get("headers", [])).get(b"content-type", b"")
    if not kind or kind.startswith(b"application/x-www-form-urlencoded"):
        scope["headers"] = [*headers, (b"content-type", b"application/json")]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for `settings` (default: from the environment). Loading starts with the server (lifespan)."""
    settings = settings or Settings()
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="srcid",
        version=__version__,
        description="One discrete vocabulary for audio, video and text: /encode turns media into two layers of "
        "codebook indices per time step; /retrieve searches the catalog across modalities.",
        lifespan=lifespan,
    )
    app.state.service = state
    install_error_handlers(app)
    for router in (encode.router, retrieve.router, items.router, health.router):
        app.include_router(router)
    app.add_middleware(Guard, state=state)
    return app
