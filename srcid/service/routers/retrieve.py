"""POST /retrieve: zero-shot cross-modal search of the catalog, by content or by a catalog item."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..dependencies import get_state
from ..models import ERROR_RESPONSES, RetrieveRequest, RetrieveResponse, RetrieveResult
from ..routing import FastJSONRoute
from ..state import ServiceState

router = APIRouter(tags=["retrieve"], route_class=FastJSONRoute)


@router.post("/retrieve", response_model=RetrieveResponse, responses=ERROR_RESPONSES)
async def retrieve(body: RetrieveRequest, state: ServiceState = Depends(get_state)) -> RetrieveResponse:
    """The `top_k` catalog items of modality `target` nearest the query (cosine of embeddings), best first.
    A query by `item_id` leaves that item out of its own results."""
    state.require_ready()
    query = body.query
    if query.item_id is not None:
        item = await state.run_in(state.io_pool, state.catalog.get, query.item_id)
        vector, exclude = item.embedding, query.item_id
    else:
        vector = (await state.encode(query.modality, [query], where="query"))[0]["embedding"]
        exclude = None
    k = body.top_k + (exclude is not None)
    hits = [(i, s) for i, s in await state.search(body.target, vector, k) if i != exclude][: body.top_k]
    items = await state.run_in(state.io_pool, state.catalog.get_many, [i for i, _ in hits])
    return RetrieveResponse(results=[
        RetrieveResult(id=i, score=s, modality=it.modality, metadata=it.metadata)
        for (i, s), it in zip(hits, items) if it is not None  # deleted since the index last caught up
    ])
