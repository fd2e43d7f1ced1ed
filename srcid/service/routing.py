"""Request bodies parsed with orjson: a /encode body of precomputed features is mostly numbers, and the standard
library's json.loads of it was the largest single cost on the event loop (docs/PERFORMANCE.md, Serve)."""

from __future__ import annotations

import json
from typing import Any, Callable, Coroutine

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute


class FastJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = orjson.loads(body)
            except orjson.JSONDecodeError:
                # orjson refuses the NaN/Infinity literals Python's json writes; parse those the standard way so
                # the features check can name the NaN (400) instead of the client getting a bare syntax error.
                self._json = json.loads(body)
        return self._json


class FastJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(FastJSONRequest(request.scope, request.receive))

        return handle
