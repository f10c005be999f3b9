"""Liveness, readiness, Prometheus metrics and the model list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from server.auth import authenticate
from server.metrics import CONTENT_TYPE_LATEST
from server.state import State

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    if not state.ready:
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "5"})
    models = [m.model_id for m in (state.images, state.chat) if m is not None]
    return JSONResponse({"status": "ready", "models": models})


@router.get("/metrics")
async def metrics(state: State) -> Response:
    """Prometheus text format. No key, as Prometheus expects: it holds counts, not
    secrets (no key names, no prompts)."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", dependencies=[Depends(authenticate)])
async def list_models(state: State) -> dict[str, Any]:
    data = []
    for local in (state.images, state.chat):
        if local is None:
            continue
        snap = local.batcher.snapshot()
        data.append({
            "id": local.model_id,
            "object": "model",
            "created": int(local.weights.path.stat().st_mtime),
            "owned_by": "spillway",
            "spillway": {
                "weights": local.weights.label,
                "source": local.weights.source,
                "path": str(local.weights.path),
                "engine": local.description,
                "queued": snap.queued,
                "items_per_s": snap.items_per_s,
            },
        })
    return {"object": "list", "data": data}
