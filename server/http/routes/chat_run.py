"""Running a chat job, whole or streamed, whatever the wire format (OpenAI or Gemini).

A streamed answer is token by token when the router keeps the job local, one event when
a cloud answers. The format (``StreamFormat``) turns events into SSE lines; this module
owns what is the same for both: routing, the ledger row when the answer ends (however it
ends), and errors that arrive after the headers are gone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from pipelines.vlm import ChatResult
from server import catalog
from server.errors import APIError
from server.http.auth import caller_of, reserve_quota
from server.http.routes.common import (
    Account,
    ClientGone,
    accounted,
    close_account,
    unless_disconnected,
)
from server.providers.base import ChatJob, ChatOutcome
from server.providers.local.chat import StreamEvent
from server.routing.dispatch import Served, check_context, to_item
from server.services import AppState


class StreamFormat(Protocol):
    def opening(self) -> list[str]: ...

    def delta(self, text: str) -> str: ...

    def closing(self, result: ChatResult) -> list[str]: ...

    def error(self, err: APIError) -> str: ...

    def ending(self) -> list[str]: ...


async def run_chat_job(request: Request, state: AppState, endpoint: str, model: str,
                       job: ChatJob, deadline: float) -> tuple[ChatOutcome, Served] | None:
    """Route, run and account for a whole chat answer; ``None`` when the client left
    first (its queued work is cancelled)."""
    dispatcher = state.require_dispatcher()
    async with accounted(request, state, endpoint, model,
                         usd_ceiling=dispatcher.cost_ceiling(job)) as account:
        try:
            outcome, served = await unless_disconnected(
                request, dispatcher.chat(job, deadline, bulk=account.bulk))
        except ClientGone:
            account.status, account.outcome = 499, "cancelled"
            return None
        account.served = served
        return outcome, served


async def stream_chat(request: Request, state: AppState, job: ChatJob, fmt: StreamFormat,
                      endpoint: str, model: str, deadline: float) -> Response:
    dispatcher = state.require_dispatcher()
    caller = caller_of(request)
    local = dispatcher.chat_local
    headers = {"Cache-Control": "no-cache"}
    if local is not None:
        route, _ = dispatcher.route_chat(job, deadline, caller.bulk)
        if route.where == "local":
            account = Account.of(request, endpoint, model)
            account.reservation = await reserve_quota(state, caller, 0,
                                                      dispatcher.cost_ceiling(job))
            try:
                item = to_item(job)
                await check_context(local, item)
                events = await local.stream(item, bulk=caller.bulk)
            except BaseException:
                await close_account(request, state, account)
                raise
            return StreamingResponse(
                stream_local(events, fmt, request, state, job, account, route.reason),
                media_type="text/event-stream",
                headers={**headers, "x-spillway-route": "local"})
    ran = await run_chat_job(request, state, endpoint, model, job, deadline)
    if ran is None:
        return Response(status_code=499)
    out, served = ran
    result = ChatResult(out.text, out.finish_reason, out.prompt_tokens, out.completion_tokens)
    return StreamingResponse(stream_whole(result, fmt), media_type="text/event-stream",
                             headers={**headers, **served.headers()})


async def stream_whole(result: ChatResult, fmt: StreamFormat) -> AsyncIterator[str]:
    """An answer that arrived whole (from a cloud): one content event."""
    for line in fmt.opening():
        yield line
    yield fmt.delta(result.text)
    for line in fmt.closing(result):
        yield line
    for line in fmt.ending():
        yield line


async def stream_local(events: AsyncIterator[StreamEvent], fmt: StreamFormat,
                       request: Request, state: AppState, job: ChatJob, account: Account,
                       reason: str) -> AsyncIterator[str]:
    """Token by token from the local batch, with one ledger row when it ends."""
    request.state.account = account  # for the access log
    for line in fmt.opening():
        yield line
    try:
        async for event in events:
            if event.result is None:
                if event.text:
                    yield fmt.delta(event.text)
                continue
            result = event.result
            outcome = ChatOutcome(result.text, result.finish_reason, result.prompt_tokens,
                                  result.completion_tokens, catalog.VLM_MODEL, 0.0)
            account.served = state.require_dispatcher().local_chat_served(
                reason, job, outcome, event.timing)
            for line in fmt.closing(result):
                yield line
    except APIError as err:
        # Headers are gone already: the error travels as an event in the API's shape.
        account.status, account.outcome = err.status, "error"
        yield fmt.error(err)
    finally:
        await close_account(request, state, account)
    for line in fmt.ending():
        yield line
