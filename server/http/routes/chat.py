"""POST /v1/chat/completions, answered by the local vision-language model or a cloud."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from server.http.deps import (
    ClientGone,
    State,
    accounted,
    deadline_s,
    new_account,
    unless_disconnected,
)
from server.job import ChatJob, ChatOutcome, Served
from server.serving import Serving
from server.serving.chat import StreamFormat
from server.wire.openai_chat import ChatRequest, OpenAIChunks, completion_body, completion_id

router = APIRouter()


async def run_chat(request: Request, serving: Serving, endpoint: str, model: str,
                   job: ChatJob, deadline: float) -> tuple[ChatOutcome, Served] | None:
    """Route, run and account for a whole chat answer; ``None`` when the client left
    first (its queued work is cancelled)."""
    async with accounted(request, serving, endpoint, model) as account:
        try:
            return await unless_disconnected(request, serving.chat.run(account, job,
                                                                       deadline))
        except ClientGone:
            return None


async def stream_chat(request: Request, serving: Serving, endpoint: str, model: str,
                      job: ChatJob, fmt: StreamFormat, deadline: float) -> Response:
    """Token by token when it runs locally, one event when a cloud answers; the stream
    closes the request's account when it ends."""
    account = new_account(request, endpoint, model)
    try:
        stream = await unless_disconnected(request, serving.chat.stream(account, job, fmt,
                                                                        deadline))
    except ClientGone:
        return Response(status_code=499)
    return StreamingResponse(stream.lines, headers=stream.headers,
                             media_type=fmt.media_type)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, state: State) -> Response:
    serving = state.require_serving()  # 503 while starting, before any image is fetched
    job = await serving.chat.job_from(body)
    deadline = deadline_s(request, state)
    cid = completion_id()
    endpoint = "/v1/chat/completions"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await stream_chat(request, serving, endpoint, body.model, job,
                                 OpenAIChunks(cid, body.model, include_usage), deadline)
    ran = await run_chat(request, serving, endpoint, body.model, job, deadline)
    if ran is None:
        return Response(status_code=499)
    outcome, served = ran
    return JSONResponse(completion_body(cid, body.model, outcome),
                        headers=served.headers())

