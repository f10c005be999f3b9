"""Claude (Anthropic's Messages API) as a cloud upstream for vision chat, through the
official ``anthropic`` SDK. Claude makes no images: the router never sends it image work
(``UpstreamSettings.does``), and the image calls here refuse.

Where requests go and with which key comes only from the upstream's settings; the SDK's
own retries are off (the router retries and fails over); every failure leaves as a
``ProviderError`` scrubbed of the key.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import AsyncIterator
from typing import Any

import anthropic
from PIL import Image

from server.config import Prices, UpstreamSettings
from server.job import ChatJob, ChatOutcome, ImageJob, ImageOutcome
from server.media.encode import png_bytes
from server.providers.base import ChatChunk, ProviderError
from server.providers.pricing import billed, chat_cost
from server.providers.upstream import (
    FOLLOW_REDIRECTS,
    Malformed,
    StatusFailure,
    classify,
    failed,
    kind_for_status,
    parse_retry_after,
)

log = logging.getLogger(__name__)

ANTHROPIC_BASE_URL = "https://api.anthropic.com"
# Claude scales a picture whose long edge is above this down before it reads it: sending
# more pixels only costs upload time. Anthropic takes at most 5 MB per image.
CLAUDE_LONG_EDGE = 1568
MAX_IMAGE_BYTES = 5 * 2**20

# Messages API stop reasons -> OpenAI finish reasons.
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
          "model_context_window_exceeded": "length", "refusal": "content_filter",
          "tool_use": "tool_calls", "pause_turn": "stop"}


# An error event inside a streamed answer (whose HTTP status was 200), by its type.
STREAM_ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401,
                       "permission_error": 403, "not_found_error": 404,
                       "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
                       "timeout_error": 504, "overloaded_error": 529}


def _status_failure(exc: BaseException) -> StatusFailure | None:
    """What the anthropic SDK says of an upstream answer that failed (529 overloaded
    counts as a server failure)."""
    if isinstance(exc, anthropic.APIStatusError):
        body = exc.body
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        status = exc.status_code
        if status < 400:  # an error event mid-stream
            status = STREAM_ERROR_STATUS.get(str(error.get("type")), 500)
        kind = kind_for_status(status)
        retry_after = parse_retry_after(exc.response.headers) if kind == "rate_limited" \
            else None
        detail = error.get("message") if isinstance(error.get("message"), str) else ""
        return StatusFailure(status, kind, f"HTTP {status}" + (f": {detail}" if detail else ""),
                             retry_after)
    if isinstance(exc, anthropic.APIResponseValidationError):
        return StatusFailure(exc.status_code, "malformed", "invalid response")
    return None


def image_block(image: Image.Image) -> dict[str, Any]:
    """A picture as a Messages API image block: at most Claude's long edge, PNG (JPEG
    when the PNG would be over the 5 MB limit)."""
    scale = CLAUDE_LONG_EDGE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)),
                              max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    data, media_type = png_bytes(image), "image/png"
    if len(data) > MAX_IMAGE_BYTES * 3 // 4:  # base64 makes 4 bytes of 3
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=90)
        data, media_type = buf.getvalue(), "image/jpeg"
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": base64.b64encode(data).decode("ascii")}}


def claude_messages(job: ChatJob) -> tuple[str | None, list[dict[str, Any]]]:
    """HF-form messages -> (the system prompt, Messages API turns). System turns become
    the system prompt; each {"type": "image"} part takes the next of ``job.images``."""
    images = iter(job.images)
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in job.messages:
        role = message.get("role", "user")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else \
            list(content or [])
        blocks: list[dict[str, Any]] = []
        for part in parts:
            if part.get("type") == "text":
                text = str(part.get("text", ""))
                if text:
                    blocks.append({"type": "text", "text": text})
            elif part.get("type") == "image":
                image = next(images, None)
                if image is None:
                    raise ProviderError("anthropic", "client", "chat: more image parts than "
                                        "images")
                blocks.append(image_block(image))
        if role == "system":
            system.extend(b["text"] for b in blocks if b["type"] == "text")
        elif blocks:
            turns.append({"role": "assistant" if role == "assistant" else "user",
                          "content": blocks})
    return ("\n\n".join(system) or None), turns


class AnthropicProvider:
    """Vision chat on Claude through ``anthropic.AsyncAnthropic``."""

    def __init__(self, settings: UpstreamSettings, prices: Prices) -> None:
        key = settings.api_key.get_secret_value() if settings.api_key is not None else ""
        if not key:
            raise ValueError(f"{settings.name} is not configured: no api_key")
        self.name = settings.name
        self.settings = settings
        self.prices = prices
        self._secrets = (key,)
        # The SDK's own client class, without following redirects (they would carry
        # the x-api-key header to wherever they point).
        http_client = anthropic.DefaultAsyncHttpxClient(follow_redirects=FOLLOW_REDIRECTS)
        # base_url is always passed, so ANTHROPIC_BASE_URL in the environment is ignored.
        self.client = anthropic.AsyncAnthropic(
            api_key=key, base_url=settings.base_url or ANTHROPIC_BASE_URL, max_retries=0,
            timeout=settings.timeout_s, http_client=http_client)

    def _fail(self, exc: BaseException, op: str) -> ProviderError:
        return failed(classify(self.name, exc, op, self._secrets, self.settings.timeout_s,
                               read_status=_status_failure,
                               timeouts=(anthropic.APITimeoutError,),
                               transports=(anthropic.APIConnectionError,)))

    async def generate_images(self, job: ImageJob, model: str) -> ImageOutcome:
        raise ProviderError(self.name, "client", "Claude does not make images")

    async def edit_images(self, job: ImageJob, model: str) -> ImageOutcome:
        raise ProviderError(self.name, "client", "Claude does not edit images")

    def request(self, job: ChatJob, model: str, system: str | None,
                turns: list[dict[str, Any]]) -> dict[str, Any]:
        """The Messages API arguments for this job. Sampling goes only when the client
        set it: the SDK no longer names ``temperature`` or ``top_p`` (they travel in the
        body), newer Claude models refuse values other than their default (a 400, which
        fails over like any refusal), and Claude takes one of the two, not both."""
        params: dict[str, Any] = {"model": self.settings.wire_name(model),
                                  "max_tokens": job.max_tokens, "messages": turns}
        if system:
            params["system"] = system
        if job.stop:
            params["stop_sequences"] = list(job.stop)
        if job.temperature != 1.0:
            # OpenAI's scale is 0..2, Claude's 0..1: above 1 is Claude's most random.
            params["extra_body"] = {"temperature": min(job.temperature, 1.0)}
        elif job.top_p < 1.0:
            params["extra_body"] = {"top_p": job.top_p}
        return params

    async def _params(self, job: ChatJob, model: str) -> dict[str, Any]:
        system, turns = await asyncio.to_thread(claude_messages, job)
        if not turns:
            raise ProviderError(self.name, "client", "chat: no user or assistant turn")
        return self.request(job, model, system, turns)

    async def chat(self, job: ChatJob, model: str) -> ChatOutcome:
        params = await self._params(job, model)
        try:
            resp = await self.client.messages.create(**params)
        except Exception as exc:
            raise self._fail(exc, "messages") from None
        return self._outcome(resp, model)

    async def stream_chat(self, job: ChatJob, model: str) -> AsyncIterator[ChatChunk]:
        """Claude's answer as it is written (the Messages API's event stream), then the
        whole outcome with its usage."""
        params = await self._params(job, model)
        try:
            async with self.client.messages.stream(**params) as stream:
                async for text in stream.text_stream:
                    yield text
                message = await stream.get_final_message()
        except Exception as exc:
            raise self._fail(exc, "messages") from None
        yield self._outcome(message, model)

    def _outcome(self, resp: object, model: str) -> ChatOutcome:
        try:
            blocks = getattr(resp, "content", None)
            if not isinstance(blocks, list):
                raise Malformed("no content in the answer")
            text = "".join(str(getattr(b, "text", "")) for b in blocks
                           if getattr(b, "type", None) == "text")
        except Malformed as exc:
            raise self._fail(exc, "messages") from None
        usage = getattr(resp, "usage", None)
        # Cached input is billed too (at other rates); counted here as input.
        prompt_tokens = sum(int(getattr(usage, f, 0) or 0) for f in (
            "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
        completion_tokens = int(getattr(usage, "output_tokens", 0) or 0)
        stop = str(getattr(resp, "stop_reason", None) or "end_turn")
        request_id = getattr(resp, "_request_id", None) or getattr(resp, "id", None)
        return ChatOutcome(
            text=text, finish_reason=FINISH.get(stop, "stop"), prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, model=model,
            cost_usd=billed(self.name, model, chat_cost(
                self.prices, self.settings, model, prompt_tokens, completion_tokens)),
            request_id=request_id if isinstance(request_id, str) else None)

    async def close(self) -> None:
        await self.client.close()
