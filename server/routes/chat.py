"""POST /v1/chat/completions, answered by the local vision-language model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from pipelines.vlm import ChatItem, fit_pixels
from server import media
from server.errors import APIError, bad_request, model_not_found, queue_full
from server.protocol_chat import (
    ChatRequest,
    ImageRef,
    chunk,
    completion_body,
    completion_id,
    context_error,
    max_tokens_of,
    parse_messages,
    sse,
    stop_strings,
    usage_chunk,
)
from server.providers.local_chat import LocalChat
from server.routes.images import ClientGone, unless_disconnected
from server.state import AppState, State

router = APIRouter()


def _check_model(state: AppState, model: str) -> LocalChat:
    local = state.local_chat()
    if model not in {local.model_id, "auto", *state.settings.vlm.aliases}:
        raise model_not_found(model)
    return local


async def _load_images(refs: list[ImageRef], state: AppState) -> list[Image.Image]:
    settings = state.settings

    async def one(ref: ImageRef) -> Image.Image:
        image = await media.load_image(ref.url, settings.media, param=ref.param)
        budget = settings.vlm.detail_pixels.get(ref.detail, settings.vlm.detail_pixels["auto"])
        return fit_pixels(image, budget)

    return list(await asyncio.gather(*(one(ref) for ref in refs)))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, state: State) -> Response:
    # 1. Cheap checks first: nothing is fetched or decoded for a request that will fail.
    local = _check_model(state, body.model)
    parsed = parse_messages(body.messages)
    limit = state.settings.media.max_images_per_request
    if len(parsed.images) > limit:
        raise bad_request(f"{len(parsed.images)} images in one request; the limit is {limit}.",
                          param="messages", code="too_many_images")
    vlm = state.settings.vlm
    max_tokens = max_tokens_of(body, vlm.default_max_tokens, vlm.max_tokens_cap)
    stops = stop_strings(body.stop)
    snap = local.batcher.snapshot()
    if snap.queued >= local.batcher.policy.max_queue:
        raise queue_full(local.batcher.estimated_wait([]))
    # 2. Images in, through the one intake path; then the prompt must fit the context.
    images = await _load_images(parsed.images, state)
    temperature = 1.0 if body.temperature is None else body.temperature
    item = ChatItem(parsed.messages, images, max_tokens, temperature, body.top_p or 1.0,
                    stops, body.seed)
    prompt_tokens = await asyncio.to_thread(local.count_tokens, item)
    if prompt_tokens + max_tokens > local.context_length:
        raise context_error(prompt_tokens, max_tokens, local.context_length)
    cid = completion_id()
    headers = {"x-spillway-route": "local", "x-spillway-cost-usd": "0",
               "x-spillway-model": f"{local.model_id}; weights={local.weights.label}"}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = await local.stream(item)
        return StreamingResponse(_sse(events, cid, body.model, include_usage),
                                 media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    try:
        result = await unless_disconnected(request, local.complete(item))
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(completion_body(cid, body.model, result), headers=headers)


async def _sse(events: AsyncIterator[object], cid: str, model: str,
               include_usage: bool) -> AsyncIterator[str]:
    from server.providers.local_chat import StreamEvent

    created = int(time.time())
    yield chunk(cid, model, created, {"role": "assistant", "content": ""},
                with_usage=include_usage)
    try:
        async for event in events:
            assert isinstance(event, StreamEvent)
            if event.result is None:
                yield chunk(cid, model, created, {"content": event.text},
                            with_usage=include_usage)
                continue
            yield chunk(cid, model, created, {}, finish=event.result.finish_reason,
                        with_usage=include_usage)
            if include_usage:
                yield usage_chunk(cid, model, created, event.result)
    except APIError as err:
        # Headers are gone already: the error travels as an event in the OpenAI shape.
        yield sse(err.body())
    yield "data: [DONE]\n\n"
