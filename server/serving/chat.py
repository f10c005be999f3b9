"""Chat, as both the HTTP routes (OpenAI's and Gemini's) and the Batch API run it: the
request checked, its images taken in, then routed, run and accounted for, whole or
streamed.

A streamed answer comes as it is written: token by token from the local model, as the
upstream sends it from Claude, in one piece from the other clouds. The wire format
(``StreamFormat``) turns events into SSE lines; this module owns what is the same for all:
the ledger row when the answer ends (however it ends), and errors that arrive after the
headers are gone.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from pipelines.vlm import ChatResult, fit_pixels
from server import catalog
from server.config import Settings
from server.errors import APIError, bad_request
from server.job import ChatJob, ChatOutcome, Served
from server.media import intake
from server.media.budget import PixelBudget
from server.routing.dispatch import BeforeSend, ChatStream, Dispatcher
from server.serving.accounting import Account, Accounting, served_by
from server.wire.openai_chat import (
    ChatRequest,
    ImageRef,
    ParsedChat,
    max_tokens_of,
    parse_messages,
    stop_strings,
)


class StreamFormat(Protocol):
    media_type: str  # the response's Content-Type

    def opening(self) -> list[str]: ...

    def delta(self, text: str) -> str: ...

    def closing(self, result: ChatResult) -> list[str]: ...

    def error(self, err: APIError) -> str: ...

    def ending(self) -> list[str]: ...


@dataclass(frozen=True)
class Stream:
    lines: AsyncIterator[str]
    headers: dict[str, str]


class ChatServing:
    def __init__(self, settings: Settings, dispatcher: Dispatcher, accounting: Accounting,
                 pixels: PixelBudget | None, *, enabled: bool) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.accounting = accounting
        self.pixels = pixels
        self.enabled = enabled

    def check_model(self, model: str) -> None:
        """The catalog's answer for this server's aliases and whether its VLM is enabled."""
        catalog.check_chat_model(model, self.settings.vlm.aliases, chat_enabled=self.enabled,
                                 clouds=self.settings.clouds)

    def check(self, body: ChatRequest, *, batch: bool = False) -> tuple[ParsedChat, int]:
        """Every check short of fetching images: (the parsed messages, max_tokens)."""
        if batch and body.stream:
            raise bad_request("Streaming is not available in a batch; omit 'stream'.",
                              param="stream", code="unsupported_value")
        self.check_model(body.model)
        parsed = parse_messages(body.messages)
        intake.check_count(len(parsed.images), self.settings.media, param="messages")
        vlm = self.settings.vlm
        max_tokens = max_tokens_of(body, vlm.default_max_tokens, vlm.max_tokens_cap)
        stop_strings(body.stop)
        return parsed, max_tokens

    async def job_from(self, body: ChatRequest) -> ChatJob:
        # 1. Cheap checks first: nothing is fetched or decoded for a request that will fail.
        parsed, max_tokens = self.check(body)
        # 2. Images in, through the one intake path.
        images = await self.load_images(parsed.images)
        temperature = 1.0 if body.temperature is None else body.temperature
        return ChatJob(messages=parsed.messages, images=images, max_tokens=max_tokens,
                       temperature=temperature, top_p=body.top_p or 1.0,
                       stop=stop_strings(body.stop), seed=body.seed, model=body.model)

    async def load_images(self, refs: list[ImageRef]) -> list[Image.Image]:
        """Each image decoded and scaled to its detail's pixels in one worker-thread step,
        within the server's pixel budget (the full-size pixels never outlive that step)."""
        settings = self.settings
        detail_pixels = settings.vlm.detail_pixels

        def fit_for(ref: ImageRef) -> intake.Fit:
            return functools.partial(fit_pixels, max_pixels=detail_pixels.get(
                ref.detail, detail_pixels["auto"]))

        return await intake.load_all(
            intake.load_image(ref.url, settings.media, param=ref.param, budget=self.pixels,
                              fit=fit_for(ref)) for ref in refs)

    async def run(self, account: Account, job: ChatJob, deadline_s: float, *,
                  before_send: BeforeSend | None = None) -> tuple[ChatOutcome, Served]:
        """Reserve the quota, route and run a whole answer; the account learns what ran
        where, or how it failed (its owner closes it)."""
        deadline_s = await self.accounting.reserve_by(account, self.dispatcher.cost_ceiling(job),
                                                      deadline_s)
        return await served_by(account, self.dispatcher.chat(
            job, deadline_s, bulk=account.bulk, before_send=before_send, tiers=account.tiers))

    async def stream(self, account: Account, job: ChatJob, fmt: StreamFormat,
                     deadline_s: float) -> Stream:
        """A streamed answer. This takes the account over and closes it: at once for a
        failure before the first line, else when the last line is sent (or the stream
        fails)."""
        headers = {"Cache-Control": "no-cache"}
        try:
            deadline_s = await self.accounting.reserve_by(
                account, self.dispatcher.cost_ceiling(job), deadline_s)
            ran = await self.dispatcher.stream_chat(job, deadline_s, bulk=account.bulk,
                                                    tiers=account.tiers)
        except APIError as err:
            account.failed(err)
            await self.accounting.close(account)
            raise
        except asyncio.CancelledError:
            account.cancelled()
            await self.accounting.close(account)
            raise
        except BaseException:
            await self.accounting.close(account)
            raise
        return Stream(self._lines(ran, fmt, account),
                      {**headers, "x-spillway-route": ran.route})

    async def _lines(self, ran: ChatStream, fmt: StreamFormat, account: Account
                     ) -> AsyncIterator[str]:
        """The answer's pieces as the API's stream lines, with one ledger row when it
        ends (however it ends)."""
        for line in fmt.opening():
            yield line
        try:
            async for event in ran.events:
                if isinstance(event, str):
                    if event:
                        yield fmt.delta(event)
                    continue
                outcome, account.served = event
                for line in fmt.closing(outcome):
                    yield line
        except APIError as err:
            # Headers are gone already: the error travels as an event in the API's shape.
            # The row names where it failed; a failed answer is not charged.
            account.status, account.outcome = err.status, "error"
            account.served = account.served or Served(ran.route, ran.reason)
            yield fmt.error(err)
        finally:
            await self.accounting.close(account)
        for line in fmt.ending():
            yield line
