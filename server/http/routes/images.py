"""POST /v1/images/generations, /v1/images/edits, /v1/images/variations and
GET /v1/images/{id}."""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from server.errors import APIError, bad_request
from server.http.deps import (
    ClientGone,
    State,
    accounted,
    caller_of,
    deadline_s,
    json_body,
    unless_disconnected,
)
from server.job import ImageJob, OutImage, Served
from server.media import intake
from server.services import AppState
from server.wire.openai_images import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageVariationRequest,
    check_stream,
    images_response,
    stream_events,
)

router = APIRouter()
# The ids of `url` images are 144 random bits: the URL itself is the credential, so a
# browser or an <img> tag can fetch it without the API key.
public_router = APIRouter()


@router.post("/v1/images/generations")
async def create_image(body: ImageGenerationRequest, request: Request, state: State) -> Response:
    job = state.require_serving().images.generation_job(body)
    if body.stream:
        check_stream(body, job)
        return await _run_streamed(request, state, "/v1/images/generations", job,
                                   "image_generation")
    return await _run(request, state, "/v1/images/generations", job)


async def run_image_job(request: Request, state: AppState, endpoint: str, job: ImageJob,
                        model: str | None = None) -> tuple[list[OutImage], Served] | None:
    """Route, run and account for an image job (one ledger row, under ``model`` if given);
    ``None`` when the client left first (its queued work is cancelled)."""
    serving = state.require_serving()
    async with accounted(request, serving, endpoint, model or job.model) as account:
        try:
            return await unless_disconnected(request, serving.images.run(
                account, job, deadline_s(request, state)))
        except ClientGone:
            return None


async def _run_streamed(request: Request, state: AppState, endpoint: str, job: ImageJob,
                        kind: str) -> Response:
    """``stream=true``: the answer as OpenAI's image stream events (server-sent)."""
    ran = await run_image_job(request, state, endpoint, job)
    if ran is None:
        return Response(status_code=499)
    images, served = ran
    events = stream_events(kind, job, [image.data for image in images])
    return StreamingResponse(iter(events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **served.headers()})


async def _run(request: Request, state: AppState, endpoint: str, job: ImageJob) -> Response:
    ran = await run_image_job(request, state, endpoint, job)
    if ran is None:
        return Response(status_code=499)
    images, served = ran
    return _respond(request, state, job, images, served)


def _respond(request: Request, state: AppState, job: ImageJob, images: list[OutImage],
             served: Served) -> Response:
    owner = caller_of(request).owner
    data: list[dict[str, Any]] = []
    for image in images:
        entry: dict[str, Any] = {"revised_prompt": None, "seed": image.seed}
        if job.response_format == "url":
            # Whose share of the store it takes: one key's burst evicts its own images.
            image_id, _ = state.store.put(image.data, image.media_type, owner)
            base = state.settings.public_url or str(request.base_url)
            entry["url"] = f"{base.rstrip('/')}/v1/images/{image_id}"
        else:
            entry["b64_json"] = base64.b64encode(image.data).decode("ascii")
        data.append(entry)
    return JSONResponse(images_response(job, data), headers=served.headers())


@router.post("/v1/images/variations")
async def create_variation(request: Request, state: State) -> Response:
    """OpenAI's images.create_variation: image-to-image of the uploaded picture with an
    empty prompt, on the local model."""
    serving = state.require_serving()
    form = await request.form(max_files=2, max_fields=32)
    try:
        uploads = form.getlist("image")
        if len(uploads) != 1 or not isinstance(uploads[0], UploadFile):
            raise bad_request("Send one picture as a multipart file named 'image'.",
                              param="image")
        data = await uploads[0].read(state.settings.media.max_bytes + 1)
        fields = {k: v for k, v in form.items() if k != "image"}
        if any(not isinstance(v, str) for v in fields.values()):
            raise bad_request("Only 'image' is a file here.", param="image")
    finally:
        await form.close()
    try:
        req = ImageVariationRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    job = await serving.images.variation_job(req, (data, "image"))
    return await _run(request, state, "/v1/images/variations", job)


@public_router.get("/v1/images/{image_id}")
async def get_image(image_id: str, state: State) -> Response:
    stored = state.store.get(image_id)
    if stored is None:
        raise APIError(404, f"No image {image_id!r}: it never existed or its URL has expired.",
                       type="not_found_error", param="image_id", code="image_not_found")
    ttl = max(0, int(stored.expires - time.time()))
    return Response(stored.data, media_type=stored.media_type,
                    headers={"Cache-Control": f"private, max-age={ttl}"})


async def _edit_inputs(request: Request, state: AppState
                       ) -> tuple[ImageEditRequest, list[bytes | str], bytes | str | None]:
    """Multipart (``image`` / repeated ``image[]`` files, an optional ``mask`` file) or
    JSON (``images[].image_url``, an optional ``mask.image_url``)."""
    limit = state.settings.media.max_images_per_request
    if request.headers.get("content-type", "").startswith("application/json"):
        raw = await json_body(request)
        if not isinstance(raw, dict):
            raise bad_request("The request body must be a JSON object.")
        refs = raw.pop("images", None) or []
        if not isinstance(refs, list) or not all(
                isinstance(r, dict) and isinstance(r.get("image_url"), str) for r in refs):
            raise bad_request("images must be a list of {\"image_url\": ...}.", param="images")
        sources: list[bytes | str] = [r["image_url"] for r in refs]
        mask_ref = raw.pop("mask", None)
        if mask_ref is not None and not (isinstance(mask_ref, dict)
                                         and isinstance(mask_ref.get("image_url"), str)):
            raise bad_request("mask must be {\"image_url\": ...}.", param="mask")
        mask: bytes | str | None = None if mask_ref is None else mask_ref["image_url"]
        fields: dict[str, object] = raw
    else:
        form = await request.form(max_files=limit + 1, max_fields=64)
        uploads = [*form.getlist("image"), *form.getlist("image[]")]
        if any(not isinstance(u, UploadFile) for u in uploads):
            raise bad_request("image must be uploaded as a file.", param="image")
        masks = form.getlist("mask")
        if len(masks) > 1 or any(not isinstance(m, UploadFile) for m in masks):
            raise bad_request("mask must be one uploaded PNG file.", param="mask")
        max_bytes = state.settings.media.max_bytes
        mask = None
        if masks:
            assert isinstance(masks[0], UploadFile)
            mask = await masks[0].read(max_bytes + 1)
        sources = []
        for upload in uploads:
            assert isinstance(upload, UploadFile)
            data = await upload.read(max_bytes + 1)
            sources.append(data)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    if not sources:
        raise bad_request("images/edits needs at least one image.", param="image")
    intake.check_count(len(sources), state.settings.media, param="image")
    try:
        req = ImageEditRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    return req, sources, mask


@router.post("/v1/images/edits")
async def edit_image(request: Request, state: State) -> Response:
    serving = state.require_serving()  # 503 while starting, before any image is decoded
    req, sources, mask = await _edit_inputs(request, state)
    params = [("image" if len(sources) == 1 else f"image[{i}]") if isinstance(src, bytes)
              else f"images[{i}]" for i, src in enumerate(sources)]
    job = await serving.images.edit_job(req, list(zip(sources, params, strict=True)),
                                        mask=None if mask is None else (mask, "mask"))
    if req.stream:
        check_stream(req, job)
        return await _run_streamed(request, state, "/v1/images/edits", job, "image_edit")
    return await _run(request, state, "/v1/images/edits", job)
