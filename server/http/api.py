"""The FastAPI application: its routers, error rendering and middleware, around the
container that server/app.py builds (the only part of the server that knows fastapi is
this package)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from server.http import errors
from server.http.deps import authenticate
from server.http.routes import batches, chat, dashboard, gemini, images, ops, usage, web
from server.services import AppState

API = FastAPI
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def build_api(state: AppState, lifespan: Lifespan) -> FastAPI:
    # /docs and /redoc with their scripts and styles served from this box (fastapi-offline
    # ships them), not from a CDN: an air-gapped box shows them too.
    app = FastAPIOffline(title="Spillway", version="0.1.0", lifespan=lifespan)
    app.state.spillway = state
    errors.install(app)
    app.include_router(ops.router)
    app.include_router(images.public_router)
    app.include_router(images.router, dependencies=[Depends(authenticate)])
    app.include_router(chat.router, dependencies=[Depends(authenticate)])
    app.include_router(usage.router, dependencies=[Depends(authenticate)])
    app.include_router(dashboard.router, dependencies=[Depends(authenticate)])
    app.include_router(web.router)  # the page needs no key; the API calls it makes do
    app.include_router(batches.router, dependencies=[Depends(authenticate)])
    app.include_router(gemini.router, dependencies=[Depends(authenticate)])
    # RequestContext, with the Files API's larger body cap on POST /v1/files only.
    app.add_middleware(batches.UploadBodyLimit,
                       max_body=int(state.settings.max_body_mb * 2**20))
    return app
