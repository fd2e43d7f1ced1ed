"""POST /retrieve: zero-shot cross-modal search of the catalog, by content or by a catalog item."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ..dependencies import get_state
from ..models import ERROR_RESPONSES, RetrieveRequest, RetrieveResponse
from ..routing import JSONBodyRoute
from ..state import ServiceState

router = APIRouter(tags=["retrieve"], route_class=JSONBodyRoute)


@router.post("/retrieve", response_model=RetrieveResponse, responses=ERROR_RESPONSES)
async def retrieve(body: RetrieveRequest, state: ServiceState = Depends(get_state)) -> dict[str, Any]:
    """The `top_k` catalog items of modality `target` nearest the query (cosine of embeddings), best first.
    A query by `item_id` leaves that item out of its own results."""
    hits = await state.retrieve(body.target, body.query, body.top_k)
    return {"results": [{"id": i, "score": s, "modality": modality, "metadata": metadata}
                        for i, s, modality, metadata in hits]}
