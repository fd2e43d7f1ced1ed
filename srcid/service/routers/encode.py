"""POST /encode: inputs of one modality -> two layers of codes per step (and the retrieval embedding)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ..dependencies import get_state
from ..errors import BadInput
from ..models import ERROR_RESPONSES, EncodeRequest, EncodeResponse
from ..routing import JSONBodyRoute
from ..state import ServiceState

router = APIRouter(tags=["encode"], route_class=JSONBodyRoute)


@router.post("/encode", response_model=EncodeResponse, responses=ERROR_RESPONSES)
async def encode(body: EncodeRequest, state: ServiceState = Depends(get_state)) -> dict[str, Any]:
    """Codes per step, `layer1` and `layer2` [T] for each input; `return_embedding` adds `embedding` [E]."""
    limit = state.settings.max_inputs
    if len(body.inputs) > limit:
        raise BadInput(f"inputs: {len(body.inputs)} given, at most {limit} per request", code="too_many_inputs")
    encoded = await state.encode(body.modality, body.inputs)
    fields = ("layer1", "layer2", "embedding") if body.return_embedding else ("layer1", "layer2")
    return {"bundle": state.bundle_id, "items": [{k: e[k] for k in fields} for e in encoded]}
