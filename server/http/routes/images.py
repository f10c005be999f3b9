"""POST /v1/images/generations and GET /v1/images/{id}."""

from __future__ import annotations

import base64
import functools
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from server.catalog import check_image_model as check_image_model  # batches import it here
from server.errors import APIError, bad_request
from server.http.auth import caller_of
from server.http.routes.common import ClientGone, accounted, deadline_s, unless_disconnected
from server.job import ImageJob
from server.media import intake as media
from server.providers.base import OutImage
from server.routing.dispatch import Served
from server.services import AppState, State
from server.wire import safejson
from server.wire.openai_images import (
    ImageEditRequest,
    ImageGenerationRequest,
    edit_size,
    fit_source,
    images_response,
    parse_size,
    to_edit_job,
    to_image_job,
)

router = APIRouter()
# The ids of `url` images are 144 random bits: the URL itself is the credential, so a
# browser or an <img> tag can fetch it without the API key.
public_router = APIRouter()


@router.post("/v1/images/generations")
async def create_image(body: ImageGenerationRequest, request: Request, state: State) -> Response:
    check_image_model(body.model)
    job = to_image_job(body, body.model or "auto", state.settings.images)
    return await _run(request, state, "/v1/images/generations", job)


async def run_image_job(request: Request, state: AppState, endpoint: str, job: ImageJob,
                        model: str | None = None) -> tuple[list[OutImage], Served] | None:
    """Route, run and account for an image job (one ledger row, under ``model`` if given);
    ``None`` when the client left first (its queued work is cancelled)."""
    dispatcher = state.require_dispatcher()
    async with accounted(request, state, endpoint, model or job.model, job.n,
                         dispatcher.cost_ceiling(job)) as account:
        try:
            images, served = await unless_disconnected(
                request, dispatcher.images(job, deadline_s(request, state),
                                           bulk=account.bulk))
        except ClientGone:
            account.status, account.outcome = 499, "cancelled"
            return None
        account.served = served
        return images, served


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


@public_router.get("/v1/images/{image_id}")
async def get_image(image_id: str, state: State) -> Response:
    stored = state.store.get(image_id)
    if stored is None:
        raise APIError(404, f"No image {image_id!r}: it never existed or its URL has expired.",
                       type="not_found_error", param="image_id", code="image_not_found")
    ttl = max(0, int(stored.expires - time.time()))
    return Response(stored.data, media_type=stored.media_type,
                    headers={"Cache-Control": f"private, max-age={ttl}"})


async def json_body(request: Request) -> Any:
    """A JSON body we parse ourselves (not through a pydantic model): ``safejson``, so
    deep nesting and lone surrogates are a 400 naming where, never a RecursionError."""
    try:
        return safejson.parse(await request.body())
    except safejson.JSONError as exc:
        raise bad_request(exc.message, param=exc.path, code="invalid_json") from None


async def _edit_inputs(request: Request, state: AppState
                       ) -> tuple[ImageEditRequest, list[bytes | str]]:
    """Multipart (``image`` / repeated ``image[]`` files) or JSON (``images[].image_url``)."""
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
    media.check_count(len(sources), state.settings.media, param="image")
    try:
        req = ImageEditRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    return req, sources


async def edit_sources(state: AppState, req: ImageEditRequest,
                       sources: list[tuple[bytes | str, str]]) -> list[Image.Image]:
    """The images of an edit, (upload bytes or URL, param) each: decoded and fitted to the
    output size in one worker-thread step, within the pixel budget. Unless ``size`` names
    the output size, the first image's shape decides it, so that one goes first. Shared
    with the Gemini API and batch lines."""
    limits, media_settings = state.settings.images, state.settings.media

    async def load(source: bytes | str, param: str, fit: media.Fit) -> Image.Image:
        if isinstance(source, bytes):
            return await media.decode_image(source, media_settings, param=param,
                                            budget=state.pixels, fit=fit)
        return await media.load_image(source, media_settings, param=param,
                                      budget=state.pixels, fit=fit)

    first: list[Image.Image] = []
    rest = sources
    if req.size in (None, "", "auto"):
        (source, param), rest = sources[0], sources[1:]
        first.append(await load(source, param, lambda im: fit_source(
            im, edit_size(req.size, im.size, limits))))
        size = first[0].size
    else:
        size = parse_size(req.size, limits)  # before any decoding: a bad size is cheap
    fit = functools.partial(fit_source, size=size)
    return first + await media.load_all(load(src, param, fit) for src, param in rest)


@router.post("/v1/images/edits")
async def edit_image(request: Request, state: State) -> Response:
    req, sources = await _edit_inputs(request, state)
    check_image_model(req.model)
    params = [("image" if len(sources) == 1 else f"image[{i}]") if isinstance(src, bytes)
              else f"images[{i}]" for i, src in enumerate(sources)]
    images = await edit_sources(state, req, list(zip(sources, params, strict=True)))
    job = to_edit_job(req, req.model or "auto", state.settings.images, images)
    return await _run(request, state, "/v1/images/edits", job)
