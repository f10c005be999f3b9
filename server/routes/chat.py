"""POST /v1/chat/completions, answered by the local vision-language model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from pipelines.vlm import ChatResult, fit_pixels
from server import media
from server.auth import caller_of, check_quota
from server.dispatch import check_context, to_item
from server.errors import APIError, bad_request, model_not_found
from server.protocol_chat import (
    ChatRequest,
    ImageRef,
    chunk,
    completion_body,
    completion_id,
    max_tokens_of,
    parse_messages,
    sse,
    stop_strings,
    usage_chunk,
)
from server.providers.base import ChatJob, ChatOutcome
from server.providers.local_chat import StreamEvent
from server.router import cloud_of
from server.routes.common import (
    Account,
    ClientGone,
    accounted,
    deadline_s,
    row_for,
    unless_disconnected,
)
from server.state import AppState, State

router = APIRouter()


def check_chat_model(state: AppState, model: str) -> None:
    local_ids = {"local-vlm", "auto", *state.settings.vlm.aliases}
    if model not in local_ids and cloud_of(model) is None:
        raise model_not_found(model)
    if model in local_ids and not state.chat_enabled and model != "auto":
        raise APIError(404, "No vision-language model is enabled on this server.",
                       param="model", code="model_not_found")


async def _load_images(refs: list[ImageRef], state: AppState) -> list[Image.Image]:
    settings = state.settings

    async def one(ref: ImageRef) -> Image.Image:
        image = await media.load_image(ref.url, settings.media, param=ref.param)
        budget = settings.vlm.detail_pixels.get(ref.detail, settings.vlm.detail_pixels["auto"])
        return fit_pixels(image, budget)

    return list(await asyncio.gather(*(one(ref) for ref in refs)))


async def chat_job_from(body: ChatRequest, state: AppState) -> ChatJob:
    """Check a chat request and take its images in; shared with durable batch jobs."""
    # 1. Cheap checks first: nothing is fetched or decoded for a request that will fail.
    check_chat_model(state, body.model)
    parsed = parse_messages(body.messages)
    limit = state.settings.media.max_images_per_request
    if len(parsed.images) > limit:
        raise bad_request(f"{len(parsed.images)} images in one request; the limit is {limit}.",
                          param="messages", code="too_many_images")
    vlm = state.settings.vlm
    max_tokens = max_tokens_of(body, vlm.default_max_tokens, vlm.max_tokens_cap)
    stops = stop_strings(body.stop)
    # 2. Images in, through the one intake path.
    images = await _load_images(parsed.images, state)
    temperature = 1.0 if body.temperature is None else body.temperature
    return ChatJob(body.model, parsed.messages, images, max_tokens, temperature,
                   body.top_p or 1.0, stops, body.seed)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, state: State) -> Response:
    dispatcher = state.require_dispatcher()
    job = await chat_job_from(body, state)
    deadline = deadline_s(request, state)
    cid = completion_id()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    local = dispatcher.chat_local
    caller = caller_of(request)
    if body.stream and local is not None:
        route, _ = dispatcher.route_chat(job, deadline, caller.bulk)
        if route.where == "local":  # token by token from the local batch
            await check_quota(state, caller)
            item = to_item(job)
            await check_context(local, item)
            events = await local.stream(item, bulk=caller.bulk)
            return StreamingResponse(
                _sse_local(events, cid, body.model, include_usage, request, state, job,
                           route.reason),
                media_type="text/event-stream",
                headers={"x-spillway-route": "local", "Cache-Control": "no-cache"})
    async with accounted(request, state, "/v1/chat/completions", body.model) as account:
        try:
            outcome, served = await unless_disconnected(
                request, dispatcher.chat(job, deadline, bulk=account.bulk))
        except ClientGone:
            account.status, account.outcome = 499, "cancelled"
            return Response(status_code=499)
        account.served = served
    result = ChatResult(outcome.text, outcome.finish_reason, outcome.prompt_tokens,
                        outcome.completion_tokens)
    if body.stream:  # a cloud answer arrives whole: one content chunk
        return StreamingResponse(_sse_whole(result, cid, body.model, include_usage),
                                 media_type="text/event-stream",
                                 headers={**served.headers(), "Cache-Control": "no-cache"})
    return JSONResponse(completion_body(cid, body.model, result), headers=served.headers())


async def _sse_whole(result: ChatResult, cid: str, model: str, include_usage: bool
                     ) -> AsyncIterator[str]:
    created = int(time.time())
    yield chunk(cid, model, created, {"role": "assistant", "content": ""},
                with_usage=include_usage)
    yield chunk(cid, model, created, {"content": result.text}, with_usage=include_usage)
    yield chunk(cid, model, created, {}, finish=result.finish_reason, with_usage=include_usage)
    if include_usage:
        yield usage_chunk(cid, model, created, result)
    yield "data: [DONE]\n\n"


async def _sse_local(events: AsyncIterator[StreamEvent], cid: str, model: str,
                     include_usage: bool, request: Request, state: AppState, job: ChatJob,
                     reason: str) -> AsyncIterator[str]:
    created = int(time.time())
    caller = caller_of(request)
    account = Account("/v1/chat/completions", model, caller.name, caller.bulk)
    yield chunk(cid, model, created, {"role": "assistant", "content": ""},
                with_usage=include_usage)
    try:
        async for event in events:
            if event.result is None:
                yield chunk(cid, model, created, {"content": event.text},
                            with_usage=include_usage)
                continue
            result = event.result
            dispatcher = state.require_dispatcher()
            outcome = ChatOutcome(result.text, result.finish_reason, result.prompt_tokens,
                                  result.completion_tokens, "local-vlm", 0.0)
            account.served = dispatcher.local_chat_served(reason, job, outcome, event.timing)
            yield chunk(cid, model, created, {}, finish=result.finish_reason,
                        with_usage=include_usage)
            if include_usage:
                yield usage_chunk(cid, model, created, result)
    except APIError as err:
        # Headers are gone already: the error travels as an event in the OpenAI shape.
        account.status, account.outcome = err.status, "error"
        yield sse(err.body())
    finally:
        if state.dispatcher is not None and (account.served or account.status != 200):
            await state.dispatcher.record(row_for(request, account))
    yield "data: [DONE]\n\n"
