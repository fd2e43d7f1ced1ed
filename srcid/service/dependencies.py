"""FastAPI dependencies: the service state and the API key check for writes."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import ServiceError
from .state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def require_api_key(request: Request) -> None:
    """Writes need `Authorization: Bearer KEY` when SRCID_API_KEY is set (401 when missing or wrong)."""
    key = request.app.state.service.settings.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if not given:
        raise ServiceError(401, "unauthorized", "this write needs an API key: Authorization: Bearer KEY")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ServiceError(401, "unauthorized", "wrong API key")
