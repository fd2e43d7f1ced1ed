"""Route classes. Every JSON body is parsed with orjson, and a body on the hot path that lists features with this
project's C parser (srcid/service/bodies.py): a /encode body of precomputed features is mostly numbers, and the
standard library's json.loads of it was once the largest single cost on the event loop.

`JSONBodyRoute`, for the endpoints on the hot path (/encode, /retrieve): the body validated against its model
directly, the endpoint awaited, its answer (a dict of JSON values and numpy arrays) written by orjson (0.8 µs a
/encode answer, against 5.6 for building response models and dumping them). FastAPI's generic path re-solves every
dependency per request, validates the body through its dependency machinery and validates the returned model
again before serialising it, ~0.1 ms of the event loop's time a request (docs/PERFORMANCE.md, Serve). pydantic's
own JSON parser (`model_validate_json`) would save 4.7 µs on a body of `features_b64` (7.5 against 12.2) and cost
29 more on one of 1,280 listed numbers (78.5 against 49.1). An endpoint of this route class is
`async def f(body: Model, state: ServiceState = Depends(get_state)) -> dict`, with its `response_model` given to
the route: FastAPI still reads both for /openapi.json, and a request gets the same answers and errors (tests check
the answers against the response models).
`FastJSONRoute` keeps FastAPI's generic path (for dependencies such as the API key check) with orjson's parse."""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable, Coroutine, get_type_hints

import orjson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from .bodies import parse_body, parse_json


class FastJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class FastJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(FastJSONRequest(request.scope, request.receive))

        return handle


class JSONBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        params = list(inspect.signature(self.endpoint).parameters)
        try:
            model = get_type_hints(self.endpoint).get(params[0]) if params else None
        except NameError:  # an annotation that does not resolve in the endpoint's module
            model = None
        if params[1:] != ["state"] or not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"{self.path}: a JSONBodyRoute endpoint is f(body: Model, state), got {params}")
        self.body_model = model

        async def handle(request: Request) -> Response:
            return Response(await self.answer(request.app.state.service, await request.body()),
                            media_type="application/json")

        return handle

    async def answer(self, state: Any, raw: bytes) -> bytes:
        """The endpoint's answer to a request body as JSON (status 200); raises what the app's error handlers turn
        into answers. The app's outer middleware calls this directly for a POST to this route's path
        (srcid/service/app.py)."""
        if not raw:
            raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
        try:
            body = self.body_model.model_validate(parse_body(raw))
        except json.JSONDecodeError as exc:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                           "input": {}, "ctx": {"error": exc.msg}}]) from None
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        return orjson.dumps(await self.endpoint(body, state), option=orjson.OPT_SERIALIZE_NUMPY)
