"""POST /v1/images/generations and GET /v1/images/{id}."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from pipelines.registry import MODEL_ID
from server import media
from server.errors import APIError, bad_request, model_not_found, queue_full
from server.job import ImageJob
from server.protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    images_response,
    to_edit_job,
    to_image_job,
)
from server.providers.local import LocalImages
from server.state import AppState, State

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
    return await _respond(request, state, local, job)


async def _respond(request: Request, state: AppState, local: LocalImages, job: ImageJob
                   ) -> Response:
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


async def _edit_inputs(request: Request, state: AppState
                       ) -> tuple[ImageEditRequest, list[bytes | str]]:
    """Multipart (``image`` / repeated ``image[]`` files) or JSON (``images[].image_url``)."""
    limit = state.settings.media.max_images_per_request
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            raw = await request.json()
        except ValueError as exc:
            raise bad_request("The request body is not valid JSON.", code="invalid_json") from exc
        if not isinstance(raw, dict):
            raise bad_request("The request body must be a JSON object.")
        refs = raw.pop("images", None) or []
        if not isinstance(refs, list) or not all(
                isinstance(r, dict) and isinstance(r.get("image_url"), str) for r in refs):
            raise bad_request("images must be a list of {\"image_url\": ...}.", param="images")
        sources: list[bytes | str] = [r["image_url"] for r in refs]
        fields: dict[str, object] = raw
    else:
        form = await request.form(max_files=limit + 1, max_fields=64)
        uploads = [*form.getlist("image"), *form.getlist("image[]")]
        if any(not isinstance(u, UploadFile) for u in uploads):
            raise bad_request("image must be uploaded as a file.", param="image")
        if "mask" in form:
            raise bad_request("Masks (inpainting) are not supported; send the image and a "
                              "prompt without a mask.", param="mask", code="unsupported_value")
        max_bytes = state.settings.media.max_bytes
        sources = []
        for upload in uploads:
            assert isinstance(upload, UploadFile)
            data = await upload.read(max_bytes + 1)
            sources.append(data)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    if "mask" in fields:
        raise bad_request("Masks (inpainting) are not supported.", param="mask",
                          code="unsupported_value")
    if not sources:
        raise bad_request("images/edits needs at least one image.", param="image")
    if len(sources) > limit:
        raise bad_request(f"{len(sources)} images in one request; the limit is {limit}.",
                          param="image", code="too_many_images")
    try:
        req = ImageEditRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    return req, sources


@router.post("/v1/images/edits")
async def edit_image(request: Request, state: State) -> Response:
    local = state.local_images()
    req, sources = await _edit_inputs(request, state)
    if req.model not in LOCAL_ALIASES:
        raise model_not_found(str(req.model))
    # Admission before the expensive part (decoding the uploads).
    snap = local.batcher.snapshot()
    if snap.queued + (req.n or 1) > local.batcher.policy.max_queue:
        raise queue_full(local.batcher.estimated_wait([]))
    media_settings = state.settings.media
    images = []
    for i, src in enumerate(sources):
        param = "image" if len(sources) == 1 else f"image[{i}]"
        if isinstance(src, bytes):
            images.append(await asyncio.to_thread(media.decode_image_bytes, src,
                                                  media_settings, param=param))
        else:
            images.append(await media.load_image(src, media_settings, param=f"images[{i}]"))
    job = to_edit_job(req, MODEL_ID, state.settings.images, images)
    return await _respond(request, state, local, job)
