"""POST /encode: inputs of one modality -> two layers of codes per step (and the retrieval embedding)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..dependencies import get_state
from ..errors import BadInput
from ..models import ERROR_RESPONSES, EncodedItem, EncodeRequest, EncodeResponse
from ..routing import JSONBodyRoute
from ..state import ServiceState

router = APIRouter(tags=["encode"], route_class=JSONBodyRoute)


@router.post("/encode", response_model=EncodeResponse, response_model_exclude_none=True, responses=ERROR_RESPONSES)
async def encode(body: EncodeRequest, state: ServiceState = Depends(get_state)) -> EncodeResponse:
    """Codes per step, `layer1` and `layer2` [T] for each input; `return_embedding` adds `embedding` [E]."""
    limit = state.settings.max_inputs
    if len(body.inputs) > limit:
        raise BadInput(f"inputs: {len(body.inputs)} given, at most {limit} per request", code="too_many_inputs")
    encoded = await state.encode(body.modality, body.inputs)
    items = [
        EncodedItem(layer1=e["layer1"].tolist(), layer2=e["layer2"].tolist(),
                    embedding=e["embedding"].tolist() if body.return_embedding else None)
        for e in encoded
    ]
    return EncodeResponse(bundle=state.bundle_id, items=items)
