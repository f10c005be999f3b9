"""Liveness, readiness, Prometheus metrics and the model list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.errors import model_not_found
from server.http.deps import State, authenticate, caller_of
from server.http.errors import google_client
from server.http.routes import gemini
from server.ops.metrics import CONTENT_TYPE_LATEST
from server.retry_after import retry_headers
from server.services import AppState

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    live = state.live()
    if not live.ready:
        return JSONResponse({"status": live.status}, status_code=503,
                            headers=retry_headers(5.0))
    models = [m.model for m in live.models]
    problem = state.storage_problem()
    if problem is not None:  # serving, but a balancer should send new work elsewhere
        return JSONResponse({"status": "storage", "detail": problem, "models": models},
                            status_code=503, headers=retry_headers(30.0))
    return JSONResponse({"status": "ready", "models": models})


@router.get("/metrics")
async def metrics(state: State) -> Response:
    """Prometheus text format. No key, as Prometheus expects: it holds counts, not
    secrets (no key names, no prompts)."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", dependencies=[Depends(authenticate)])
async def list_models(request: Request, state: State) -> dict[str, Any]:
    """The OpenAI model list; the google-genai SDK (3.x calls /v1) gets Gemini's."""
    if google_client(request.headers):
        return {"models": gemini.gemini_models(state)}
    return {"object": "list", "data": _openai_models(state, caller_of(request).admin)}


@router.get("/v1/models/{model}", dependencies=[Depends(authenticate)])
async def get_model(model: str, request: Request, state: State) -> dict[str, Any]:
    if google_client(request.headers):
        return gemini.gemini_model(state, model)
    for entry in _openai_models(state, caller_of(request).admin):
        if entry["id"] == model:
            return entry
    raise model_not_found(model)


def _openai_models(state: AppState, admin: bool) -> list[dict[str, Any]]:
    """Where the weights live on disk is the operator's business: the admin key sees the
    path, a team's key (or anyone, on an open server) only which weights they are."""
    data = []
    for local in state.live().models:
        about: dict[str, Any] = {
            "weights": local.weights,
            "source": local.source,
            "engine": local.engine,
            "queued": local.queued,
            "items_per_s": local.items_per_s,
        }
        if local.workers:
            about["workers"] = [{
                "name": w.name, "device": w.device, "state": w.state, "batches": w.batches,
                "items": w.items, "items_per_s": w.items_per_s, "restarts": w.restarts,
                **({"pid": w.pid, "load_error": w.load_error} if admin else {}),
            } for w in local.workers]
        if admin:
            about["path"] = str(local.path)
        data.append({
            "id": local.model,
            "object": "model",
            "created": int(local.path.stat().st_mtime) if local.path is not None else 0,
            "owned_by": "spillway",
            "spillway": about,
        })
    return data
