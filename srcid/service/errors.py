"""Every error the service answers is `{"error": {"code", "message"}}` with the status of DESIGN §7."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from srcid.index.errors import CatalogError

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An answer other than success: `status` is the HTTP status, `code` a stable machine-readable name."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class BadInput(ServiceError):
    def __init__(self, message: str, code: str = "bad_input"):
        super().__init__(400, code, message)


class NotReady(ServiceError):
    def __init__(self, message: str):
        super().__init__(503, "not_ready", message)


class Overloaded(ServiceError):
    def __init__(self, message: str):
        super().__init__(429, "overloaded", message)


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _where(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{_where(tuple(first.get('loc', ())))}: {first.get('msg', 'invalid')}{more}"


def error_response_for(exc: Exception) -> JSONResponse:
    """The answer to an exception a request raised: its status and `{"error": {"code", "message"}}`."""
    if isinstance(exc, ServiceError):
        return error_response(exc.status, exc.code, exc.message)
    if isinstance(exc, CatalogError):
        if exc.http_status >= 500 and exc.http_status != 503:
            log.error("catalog error: %s", exc.message)
        return error_response(exc.http_status, exc.code, exc.message)
    if isinstance(exc, RequestValidationError):
        # A body that is not JSON at all is 400; JSON of the wrong shape is 422 (FastAPI's own choice).
        if "json_invalid" in {e.get("type") for e in exc.errors()}:
            return error_response(400, "invalid_json", "body: not valid JSON")
        return error_response(422, "invalid_request", _validation_message(exc))
    if isinstance(exc, StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "body_too_large"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                              headers=getattr(exc, "headers", None))
    log.error("unhandled error", exc_info=exc)
    return error_response(500, "internal", f"internal error ({type(exc).__name__}); see the server log")


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return error_response_for(exc)

    for kind in (ServiceError, CatalogError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)
