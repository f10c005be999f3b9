"""Google Gemini (the Gemini Developer API) as a cloud provider, through ``google-genai``.

One ``generateContent`` call per image (the API answers with one picture), run
concurrently. Where requests go and with which key comes only from ``GeminiSettings``;
every upstream failure leaves as a ``ProviderError`` scrubbed of the key.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image

from server.config import GeminiSettings, Prices, UpstreamSettings
from server.config_upstreams import as_upstream
from server.job import ChatJob, ChatOutcome, ImageJob, ImageOutcome
from server.media.encode import png_bytes
from server.providers.base import ChatChunk, ProviderError, whole
from server.providers.pricing import billed, chat_cost, image_cost, nearest_shape
from server.providers.upstream import (
    FOLLOW_REDIRECTS,
    Malformed,
    StatusFailure,
    b64decode_strict,
    classify,
    failed,
    finish_images,
    kind_for_status,
    parse_retry_after,
)

log = logging.getLogger(__name__)

GEMINI_BASE_URL = "https://generativelanguage.googleapis.com/"
DEFAULT_API_VERSION = "v1beta"

# Aspect ratios the image models take (imageConfig.aspectRatio).
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "9:16", "16:9", "21:9")

# A 200 without an image for these reasons is the request's fault, not the upstream's.
_BLOCKED_FINISH = {"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION",
                   "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION",
                   "IMAGE_OTHER", "NO_IMAGE"}

# No tools are passed; saying so also keeps the SDK from logging "AFC is enabled" per call.
_NO_AFC = types.AutomaticFunctionCallingConfig(disable=True)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")

T = TypeVar("T")


def nearest_aspect(width: int, height: int) -> str:
    return nearest_shape(width, height, ASPECT_RATIOS, ":")


def retry_delay_from_details(details: object) -> float | None:
    """``retryDelay`` ("7s", "0.5s") of a google.rpc.RetryInfo in an error body."""
    if not isinstance(details, dict):
        return None
    error = details.get("error", details)
    items = error.get("details") if isinstance(error, dict) else None
    if not isinstance(items, list):
        return None
    for item in items:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("RetryInfo"):
            match = _DURATION.match(str(item.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def _enum_name(value: object) -> str:
    name = getattr(value, "value", value)
    return str(name) if name is not None else ""


def _status_failure(exc: BaseException) -> StatusFailure | None:
    """What google-genai says of an upstream answer that failed."""
    if not isinstance(exc, genai_errors.APIError):
        return None
    status = int(exc.code) if isinstance(exc.code, int) else 0
    kind = kind_for_status(status) if status else "server"
    if kind == "client" and "API_KEY_INVALID" in str(exc.details):
        kind = "auth"  # Gemini answers a bad key with 400
    retry_after = None
    if kind == "rate_limited":
        retry_after = retry_delay_from_details(exc.details)
        if retry_after is None:
            headers = getattr(exc.response, "headers", None)
            retry_after = parse_retry_after(headers) if headers is not None else None
    detail = exc.message if isinstance(exc.message, str) else ""
    upstream_status = exc.status if isinstance(exc.status, str) else ""
    message = f"HTTP {status} {upstream_status}".rstrip()
    if detail:
        message += f": {detail}"
    return StatusFailure(status, kind, message, retry_after)


class GeminiProvider:
    """Gemini images (``gemini-2.5-flash-image``) and vision chat through
    ``google.genai.Client(...).aio.models.generate_content``."""

    def __init__(self, settings: UpstreamSettings | GeminiSettings, prices: Prices) -> None:
        settings = as_upstream(settings)
        key = settings.api_key.get_secret_value() if settings.api_key is not None else ""
        if not key:
            raise ValueError(f"{settings.name} is not configured: no api_key")
        self.name = settings.name
        self.settings = settings
        self.prices = prices
        self._secrets = (key, key.strip())
        # Our own HTTP clients, because the SDK's follow redirects, and with aiohttp
        # installed (Ray brings it) its async calls would go through aiohttp, which
        # follows them too: a client given here is the one the SDK uses, and the only one.
        # The SDK passes the timeout per request; it never closes these (close() does).
        self._http = httpx.AsyncClient(follow_redirects=FOLLOW_REDIRECTS)
        self._http_sync = httpx.Client(follow_redirects=FOLLOW_REDIRECTS)
        # Everything explicit, so no GOOGLE_* environment variable redirects the key:
        # not Vertex, this base URL, this version, no SDK retries (the router retries).
        self.client = genai.Client(
            vertexai=False, api_key=key,
            http_options=types.HttpOptions(
                base_url=settings.base_url or GEMINI_BASE_URL,
                api_version=settings.api_version or DEFAULT_API_VERSION,
                timeout=max(1, int(settings.timeout_s * 1000)),
                retry_options=types.HttpRetryOptions(attempts=1),
                httpx_client=self._http_sync, httpx_async_client=self._http))

    # -- errors

    def _error(self, exc: BaseException, op: str) -> ProviderError:
        return classify(self.name, exc, op, self._secrets, self.settings.timeout_s,
                        read_status=_status_failure)

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except Exception as exc:
            raise failed(self._error(exc, op)) from None

    def _fail(self, err: ProviderError) -> ProviderError:
        return failed(err)

    # -- images

    async def generate_images(self, job: ImageJob, model: str) -> ImageOutcome:
        return await self._images(job, model, [[job.prompt]] * job.n, "generate")

    async def edit_images(self, job: ImageJob, model: str) -> ImageOutcome:
        if not job.init_images:
            raise ProviderError(self.name, "client", "edit: no source image")
        sources = await asyncio.to_thread(lambda: [png_bytes(im) for im in job.init_images])
        # As locally: output i edits source i % len(sources).
        contents: list[list[Any]] = [
            [types.Part.from_bytes(data=sources[i % len(sources)], mime_type="image/png"),
             job.prompt]
            for i in range(job.n)]
        return await self._images(job, model, contents, "edit")

    async def _images(self, job: ImageJob, model: str, contents: list[list[Any]],
                      op: str) -> ImageOutcome:
        config = types.GenerateContentConfig(
            automatic_function_calling=_NO_AFC, response_modalities=["TEXT", "IMAGE"],
            image_config=types.ImageConfig(aspect_ratio=nearest_aspect(job.width, job.height)))
        tasks = [asyncio.ensure_future(self._one_image(model, c, config, op)) for c in contents]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one failed: the rest are not wanted
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        blobs = [blob for blob, _ in answers]
        try:
            images = await asyncio.to_thread(finish_images, blobs, job)
        except Malformed as exc:
            raise self._fail(self._error(exc, op)) from None
        request_id = next((rid for _, rid in answers if rid), None)
        return ImageOutcome(images=images, model=model,
                            cost_usd=billed(self.name, model, image_cost(
                                self.prices, self.settings, model, job.quality, job.width,
                                job.height, len(images))),
                            request_id=request_id)

    async def _one_image(self, model: str, contents: list[Any],
                         config: types.GenerateContentConfig,
                         op: str) -> tuple[bytes, str | None]:
        resp = await self._call(op, lambda: self.client.aio.models.generate_content(
            model=self.settings.wire_name(model), contents=contents, config=config))
        for candidate in resp.candidates or []:
            for part in (candidate.content.parts if candidate.content else None) or []:
                blob = part.inline_data
                if blob is None or not (blob.mime_type or "").startswith("image/"):
                    continue
                data: object = blob.data
                if isinstance(data, str):  # a relay that left it as base64
                    data = b64decode_strict(data)
                if isinstance(data, bytes) and data:
                    return data, resp.response_id
        raise self._fail(self._no_image(resp, op))

    def _no_image(self, resp: types.GenerateContentResponse, op: str) -> ProviderError:
        feedback = resp.prompt_feedback
        block = _enum_name(feedback.block_reason) if feedback is not None else ""
        finishes = [_enum_name(c.finish_reason) for c in resp.candidates or []]
        if block:
            return ProviderError(self.name, "client", f"{op}: prompt blocked ({block})")
        blocked = [f for f in finishes if f in _BLOCKED_FINISH]
        if blocked:
            return ProviderError(self.name, "client", f"{op}: no image ({blocked[0]})")
        return ProviderError(self.name, "malformed", f"{op}: no image in the answer")

    # -- chat

    async def chat(self, job: ChatJob, model: str) -> ChatOutcome:
        system, contents = await asyncio.to_thread(gemini_contents, job)
        config = types.GenerateContentConfig(
            automatic_function_calling=_NO_AFC, system_instruction=system,
            max_output_tokens=job.max_tokens,
            temperature=job.temperature, top_p=job.top_p,
            stop_sequences=list(job.stop) if job.stop else None, seed=job.seed)
        resp = await self._call("chat", lambda: self.client.aio.models.generate_content(
            model=self.settings.wire_name(model), contents=contents, config=config))
        candidates = resp.candidates or []
        if not candidates:
            if resp.prompt_feedback is not None and resp.prompt_feedback.block_reason:
                raise self._fail(ProviderError(
                    self.name, "client",
                    f"chat: prompt blocked ({_enum_name(resp.prompt_feedback.block_reason)})"))
            raise self._fail(ProviderError(self.name, "malformed", "chat: no candidates"))
        candidate = candidates[0]
        parts = (candidate.content.parts if candidate.content else None) or []
        text = "".join(p.text for p in parts if p.text and not p.thought)
        finish = "length" if _enum_name(candidate.finish_reason) == "MAX_TOKENS" else "stop"
        usage = resp.usage_metadata
        prompt_tokens = (usage.prompt_token_count or 0) if usage else 0
        completion_tokens = ((usage.candidates_token_count or 0)
                             + (usage.thoughts_token_count or 0)) if usage else 0
        return ChatOutcome(
            text=text, finish_reason=finish, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, model=model,
            cost_usd=billed(self.name, model, chat_cost(
                self.prices, self.settings, model, prompt_tokens, completion_tokens)),
            request_id=resp.response_id)

    async def stream_chat(self, job: ChatJob, model: str) -> AsyncIterator[ChatChunk]:
        """The answer whole, as a stream of one piece (not yet token by token here)."""
        async for chunk in whole(await self.chat(job, model)):
            yield chunk

    async def close(self) -> None:
        await self.client.aio.aclose()
        self.client.close()
        await self._http.aclose()
        self._http_sync.close()


def gemini_contents(job: ChatJob) -> tuple[str | None, list[types.Content]]:
    """HF-form messages -> (system instruction, contents). System text goes to the
    instruction; assistant turns are "model"; {"type": "image"} parts take the next of
    ``job.images`` as PNG bytes."""
    images = iter(job.images)
    system: list[str] = []
    contents: list[types.Content] = []
    for message in job.messages:
        role = message.get("role", "user")
        content = message.get("content")
        raw_parts: list[dict[str, Any]] = (
            [{"type": "text", "text": content or ""}]
            if content is None or isinstance(content, str) else list(content))
        if role == "system":
            system.extend(str(p.get("text", "")) for p in raw_parts if p.get("type") == "text")
            continue
        parts: list[types.Part] = []
        for part in raw_parts:
            if part.get("type") == "text":
                text = str(part.get("text", ""))
                if text:
                    parts.append(types.Part(text=text))
            elif part.get("type") == "image":
                image: Image.Image | None = next(images, None)
                if image is None:
                    raise ProviderError("gemini", "client", "chat: more image parts than images")
                parts.append(types.Part.from_bytes(data=png_bytes(image), mime_type="image/png"))
        if parts:
            contents.append(types.Content(role="model" if role == "assistant" else "user",
                                          parts=parts))
    return ("\n".join(system) if system else None), contents
