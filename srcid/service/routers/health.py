"""GET /healthz (the process answers), /readyz (bundle and index loaded), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..dependencies import get_state
from ..routing import FastJSONRoute
from ..state import ServiceState

router = APIRouter(tags=["health"], route_class=FastJSONRoute)


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "alive"}


@router.get("/readyz", responses={503: {"description": "still loading, or loading failed (see error)"}})
async def readyz(state: ServiceState = Depends(get_state)) -> JSONResponse:
    """Ready: bundle, runtime backend, index backend and item counts. Not ready: 503 with what it is doing or
    why it failed."""
    waiting = state.workers_waiting() if state.ready else None
    if not state.ready or waiting:
        status = waiting or state.status
        return JSONResponse({"error": {"code": "not_ready", "message": f"not ready: {state.error or status}"},
                             "status": status}, status_code=503)
    bundle, index = state.bundle, state.index
    cache = None
    if state.cache is not None:
        cache = {"url": state.cache.url, "reachable": await state.cache.ping()}
    def caught_up() -> dict:
        index.sync()
        return index.describe()

    describe = await state.run_in(state.io_pool, caught_up)
    return JSONResponse({
        "status": "ready",
        "bundle": {"id": state.bundle_id, "path": str(bundle.root), "modalities": bundle.modalities,
                   "T": bundle.manifest.T, "embedding_dim": bundle.manifest.embedding_dim,
                   "runtime_backend": bundle.backend,
                   "frontends": {m: "features only: " + state.features_only[m] if m in state.features_only else
                                 e.frontend.name for m, e in bundle.manifest.modalities.items()}},
        "index": {"backend": index.backend_name, "kind": describe["kind"], "ivf": describe["ivf"],
                  "counts": describe["counts"], "position": describe["position"],
                  "catalog_version": describe["catalog_version"], "catalog": state.catalog.url},
        "cache": cache,
    })


@router.get("/metrics")
async def metrics(state: ServiceState = Depends(get_state)) -> Response:
    state.forget_dead_workers()
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
