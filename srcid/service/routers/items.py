"""POST /items, GET /items/{id}, DELETE /items/{id}: the catalog that /retrieve searches."""

from __future__ import annotations

from collections import defaultdict

from fastapi import APIRouter, Depends, Query

from ..dependencies import get_state, require_api_key
from ..errors import BadInput
from ..models import ERROR_RESPONSES, AddItemsRequest, AddItemsResponse, DeleteResponse, ItemResponse
from ..routing import FastJSONRoute
from ..state import ServiceState

router = APIRouter(tags=["items"], route_class=FastJSONRoute)


@router.post("/items", status_code=201, response_model=AddItemsResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_api_key)])
async def add_items(body: AddItemsRequest, state: ServiceState = Depends(get_state)) -> AddItemsResponse:
    """Encode each item's INPUT and store id, modality, metadata, codes and embedding (all or none; 409 when an
    id exists)."""
    state.require_ready()
    limit = state.settings.max_inputs
    if len(body.items) > limit:
        raise BadInput(f"items: {len(body.items)} given, at most {limit} per request", code="too_many_inputs")
    by_modality: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(body.items):
        by_modality[item.modality].append(i)
    encoded: dict[int, dict] = {}
    for modality, rows in by_modality.items():
        out = await state.encode(modality, [body.items[i] for i in rows], where=f"items[{modality}]")
        encoded.update(zip(rows, out))
    new = [state.new_item(it.id, it.modality, encoded[i], it.metadata) for i, it in enumerate(body.items)]
    await state.run_in(state.io_pool, state.catalog.add, new)
    return AddItemsResponse(added=[it.id for it in new])


@router.get("/items/{item_id:path}", response_model=ItemResponse, response_model_exclude_none=True,
            responses=ERROR_RESPONSES)
async def get_item(item_id: str, embedding: bool = Query(False, description="include the embedding [E]"),
                   state: ServiceState = Depends(get_state)) -> ItemResponse:
    state.require_ready()
    item = await state.run_in(state.io_pool, state.catalog.get, item_id)
    return ItemResponse(id=item.id, modality=item.modality, metadata=item.metadata, codes=item.codes,
                        embedding=item.embedding.tolist() if embedding else None)


@router.delete("/items/{item_id:path}", response_model=DeleteResponse, responses=ERROR_RESPONSES,
               dependencies=[Depends(require_api_key)])
async def delete_item(item_id: str, state: ServiceState = Depends(get_state)) -> DeleteResponse:
    state.require_ready()
    await state.run_in(state.io_pool, state.catalog.delete, item_id)
    return DeleteResponse(deleted=item_id)
