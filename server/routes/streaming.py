"""Streaming a chat answer, whatever the wire format: OpenAI chunks or Gemini responses.

The format (``StreamFormat``) turns events into SSE lines; this module owns what is the
same for both: the ledger row when the stream ends, however it ends, and errors that
arrive after the headers are gone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import Request

from pipelines.vlm import ChatResult
from server.auth import caller_of
from server.errors import APIError
from server.providers.base import ChatJob, ChatOutcome
from server.providers.local_chat import StreamEvent
from server.routes.common import Account, row_for
from server.state import AppState


class StreamFormat(Protocol):
    def opening(self) -> list[str]: ...

    def delta(self, text: str) -> str: ...

    def closing(self, result: ChatResult) -> list[str]: ...

    def error(self, err: APIError) -> str: ...

    def ending(self) -> list[str]: ...


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
                       request: Request, state: AppState, job: ChatJob, endpoint: str,
                       model: str, reason: str) -> AsyncIterator[str]:
    """Token by token from the local batch, with one ledger row when it ends."""
    caller = caller_of(request)
    account = Account(endpoint, model, caller.name, caller.bulk)
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
                                  result.completion_tokens, "local-vlm", 0.0)
            account.served = state.require_dispatcher().local_chat_served(
                reason, job, outcome, event.timing)
            for line in fmt.closing(result):
                yield line
    except APIError as err:
        # Headers are gone already: the error travels as an event in the API's shape.
        account.status, account.outcome = err.status, "error"
        yield fmt.error(err)
    finally:
        if state.dispatcher is not None and (account.served or account.status != 200):
            await state.dispatcher.record(row_for(request, account))
    for line in fmt.ending():
        yield line
