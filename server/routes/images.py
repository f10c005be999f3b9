"""POST /v1/images/generations and GET /v1/images/{id}."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from pipelines.registry import MODEL_ID
from server.errors import APIError, model_not_found
from server.protocol import ImageGenerationRequest, images_response, to_image_job
from server.state import State

router = APIRouter()
T = TypeVar("T")

LOCAL_ALIASES = {None, "", "auto", MODEL_ID}


class ClientGone(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Race the work against the client leaving; if it leaves, the work is cancelled
    (and with it every queued item of the request)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone


@router.post("/v1/images/generations")
async def create_image(body: ImageGenerationRequest, request: Request, state: State) -> Response:
    if body.model not in LOCAL_ALIASES:
        raise model_not_found(str(body.model))
    local = state.local_images()
    job = to_image_job(body, MODEL_ID, state.settings.images)
    started = time.monotonic()
    try:
        generated = await unless_disconnected(request, local.generate(job))
    except ClientGone:
        return Response(status_code=499)
    data: list[dict[str, Any]] = []
    for image in generated:
        entry: dict[str, Any] = {"revised_prompt": None, "seed": image.seed}
        if job.response_format == "url":
            image_id, _ = state.store.put(image.data, image.media_type)
            base = state.settings.public_url or str(request.base_url)
            entry["url"] = f"{base.rstrip('/')}/v1/images/{image_id}"
        else:
            entry["b64_json"] = base64.b64encode(image.data).decode("ascii")
        data.append(entry)
    headers = {
        "x-spillway-route": "local",
        "x-spillway-cost-usd": "0",
        "x-spillway-model": f"{MODEL_ID}; weights={local.weights.label}",
        "x-spillway-elapsed-ms": str(round((time.monotonic() - started) * 1000)),
    }
    return JSONResponse(images_response(job, data), headers=headers)


@router.get("/v1/images/{image_id}")
async def get_image(image_id: str, state: State) -> Response:
    stored = state.store.get(image_id)
    if stored is None:
        raise APIError(404, f"No image {image_id!r}: it never existed or its URL has expired.",
                       type="not_found_error", param="image_id", code="image_not_found")
    ttl = max(0, int(stored.expires - time.time()))
    return Response(stored.data, media_type=stored.media_type,
                    headers={"Cache-Control": f"private, max-age={ttl}"})
