"""POST /v1/chat/completions, answered by the local vision-language model."""

from __future__ import annotations

import functools

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image

from pipelines.vlm import ChatResult, fit_pixels
from server import catalog
from server.http.routes.chat_run import run_chat_job, stream_chat
from server.http.routes.common import (
    deadline_s,
)
from server.media import intake as media
from server.providers.base import ChatJob
from server.services import AppState, State
from server.wire.openai_chat import (
    ChatRequest,
    ImageRef,
    OpenAIChunks,
    completion_body,
    completion_id,
    max_tokens_of,
    parse_messages,
    stop_strings,
)

router = APIRouter()


def check_chat_model(state: AppState, model: str) -> None:
    """The catalog's answer for this server's aliases and whether its VLM is enabled."""
    catalog.check_chat_model(model, state.settings.vlm.aliases,
                             chat_enabled=state.chat_enabled)


async def load_images(refs: list[ImageRef], state: AppState) -> list[Image.Image]:
    """Each image decoded and scaled to its detail's pixels in one worker-thread step,
    within the server's pixel budget (the full-size pixels never outlive that step)."""
    settings = state.settings
    detail_pixels = settings.vlm.detail_pixels

    def fit_for(ref: ImageRef) -> media.Fit:
        return functools.partial(fit_pixels, max_pixels=detail_pixels.get(
            ref.detail, detail_pixels["auto"]))

    return await media.load_all(
        media.load_image(ref.url, settings.media, param=ref.param, budget=state.pixels,
                         fit=fit_for(ref)) for ref in refs)


async def chat_job_from(body: ChatRequest, state: AppState) -> ChatJob:
    """Check a chat request and take its images in; shared with durable batch jobs."""
    # 1. Cheap checks first: nothing is fetched or decoded for a request that will fail.
    check_chat_model(state, body.model)
    parsed = parse_messages(body.messages)
    media.check_count(len(parsed.images), state.settings.media, param="messages")
    vlm = state.settings.vlm
    max_tokens = max_tokens_of(body, vlm.default_max_tokens, vlm.max_tokens_cap)
    stops = stop_strings(body.stop)
    # 2. Images in, through the one intake path.
    images = await load_images(parsed.images, state)
    temperature = 1.0 if body.temperature is None else body.temperature
    return ChatJob(body.model, parsed.messages, images, max_tokens, temperature,
                   body.top_p or 1.0, stops, body.seed)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, state: State) -> Response:
    state.require_dispatcher()  # 503 while starting, before any image is fetched
    job = await chat_job_from(body, state)
    deadline = deadline_s(request, state)
    cid = completion_id()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        fmt = OpenAIChunks(cid, body.model, include_usage)
        return await stream_chat(request, state, job, fmt, "/v1/chat/completions",
                                 body.model, deadline)
    ran = await run_chat_job(request, state, "/v1/chat/completions", body.model, job, deadline)
    if ran is None:
        return Response(status_code=499)
    outcome, served = ran
    result = ChatResult(outcome.text, outcome.finish_reason, outcome.prompt_tokens,
                        outcome.completion_tokens)
    return JSONResponse(completion_body(cid, body.model, result), headers=served.headers())
