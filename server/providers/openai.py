"""OpenAI (or an OpenAI-compatible relay, or Azure OpenAI) as a cloud provider.

The official SDK does the talking, with its own retries off: Spillway's router retries
and fails over itself. Where requests go and with which key comes only from
``OpenAISettings``, never from a request. Every upstream failure leaves as a
``ProviderError`` whose message has been scrubbed of the key.

What every upstream shares (decoding its images, scrubbing keys, reading Retry-After,
classifying failures) is server/providers/upstream.py.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

import openai
from PIL import Image

from server.config import OpenAISettings, Prices, UpstreamSettings
from server.config_upstreams import as_upstream
from server.job import ChatJob, ChatOutcome, ImageJob, ImageOutcome
from server.media.encode import png_bytes
from server.providers.base import ChatChunk, ProviderError, whole
from server.providers.pricing import (
    billed,
    chat_cost,
    image_cost,
    image_usage_cost,
    openai_quality_tier,
    upstream_size,
)
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

OPENAI_BASE_URL = "https://api.openai.com/v1"

# ---------------------------------------------------------------- OpenAI

_Quality = Literal["low", "medium", "high"]


def upstream_quality(quality: str) -> _Quality:
    return cast(_Quality, openai_quality_tier(quality))


def _error_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message")
        if isinstance(message, str):
            return message
    if isinstance(body, str):
        return body
    return ""


def _status_failure(exc: BaseException) -> StatusFailure | None:
    """What the openai SDK says of an upstream answer that failed."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        kind = kind_for_status(status)
        retry_after = parse_retry_after(exc.response.headers) if kind == "rate_limited" \
            else None
        detail = _error_detail(exc)
        return StatusFailure(status, kind, f"HTTP {status}" + (f": {detail}" if detail else ""),
                             retry_after)
    if isinstance(exc, openai.APIResponseValidationError):
        return StatusFailure(exc.status_code, "malformed", "invalid response")
    return None


class OpenAIProvider:
    """OpenAI images and vision chat through ``openai.AsyncOpenAI`` (``AsyncAzureOpenAI``
    for an azure upstream): OpenAI itself, a relay, or Azure."""

    def __init__(self, settings: UpstreamSettings | OpenAISettings, prices: Prices) -> None:
        up = as_upstream(settings)
        key = up.api_key.get_secret_value() if up.api_key is not None else ""
        if not key:
            raise ValueError(f"{up.name} is not configured: no api_key")
        self.name = up.name
        self.settings = up
        self.prices = prices
        self._secrets = (key,)
        # The SDK's own client class (its timeouts and pool limits), but not its
        # follow_redirects=True; closed by ``self.client.close()``.
        http_client = openai.DefaultAsyncHttpxClient(follow_redirects=FOLLOW_REDIRECTS)
        self.client: openai.AsyncOpenAI
        if up.kind == "azure":
            self.client = openai.AsyncAzureOpenAI(
                api_key=key, azure_endpoint=str(up.azure_endpoint),
                api_version=up.azure_api_version, organization=up.organization,
                max_retries=0, timeout=up.timeout_s, http_client=http_client)
        else:
            # base_url is always passed, so OPENAI_BASE_URL in the environment is ignored.
            self.client = openai.AsyncOpenAI(
                api_key=key, base_url=up.base_url or OPENAI_BASE_URL,
                organization=up.organization, max_retries=0,
                timeout=up.timeout_s, http_client=http_client)

    def _upstream_model(self, model: str) -> str:
        """The name the upstream knows the model by (an Azure deployment, a relay's)."""
        return self.settings.wire_name(model)

    # -- errors

    def _fail(self, exc: BaseException, op: str) -> ProviderError:
        return failed(classify(self.name, exc, op, self._secrets, self.settings.timeout_s,
                               read_status=_status_failure,
                               timeouts=(openai.APITimeoutError,),
                               transports=(openai.APIConnectionError,)))

    # -- images

    def _image_params(self, job: ImageJob, model: str) -> dict[str, Any]:
        """What this model takes: gpt-image models a quality and an output format (and
        always answer in base64); DALL-E a response format, and DALL-E 3 standard or hd."""
        params: dict[str, Any] = {"model": self._upstream_model(model),
                                  "size": upstream_size(model, job.width, job.height)}
        family = model.lower()
        if family.startswith("dall-e"):
            params["response_format"] = "b64_json"
            if family.startswith("dall-e-3"):
                params["quality"] = "hd" if openai_quality_tier(job.quality) == "high" \
                    else "standard"
        else:
            params["quality"] = upstream_quality(job.quality)
            params["output_format"] = "png"
        return params

    async def generate_images(self, job: ImageJob, model: str) -> ImageOutcome:
        params = self._image_params(job, model)
        # DALL-E 3 makes one image per call: n calls, at once.
        calls = job.n if model.lower().startswith("dall-e-3") else 1
        try:
            resps = await asyncio.gather(*(self.client.images.generate(
                prompt=job.prompt, n=job.n // calls, **params) for _ in range(calls)))
        except Exception as exc:
            raise self._fail(exc, "images.generate") from None
        return await self._image_outcome(resps, job, model, "images.generate")

    async def edit_images(self, job: ImageJob, model: str) -> ImageOutcome:
        if not job.init_images:
            raise ProviderError(self.name, "client", "images.edit: no source image")
        params = self._image_params(job, model)
        pngs = await asyncio.to_thread(lambda: [png_bytes(im) for im in job.init_images])
        files = [(f"image_{i}.png", data, "image/png") for i, data in enumerate(pngs)]
        image: Any = files[0] if len(files) == 1 else files
        if job.mask is not None:  # OpenAI's mask: transparent where to repaint
            mask = await asyncio.to_thread(openai_mask, job.mask)
            params["mask"] = ("mask.png", mask, "image/png")
        try:
            resp = await self.client.images.edit(image=image, prompt=job.prompt, n=job.n,
                                                 **params)
        except Exception as exc:
            raise self._fail(exc, "images.edit") from None
        return await self._image_outcome([resp], job, model, "images.edit")

    async def _image_outcome(self, resps: list[Any], job: ImageJob, model: str,
                             op: str) -> ImageOutcome:
        try:
            data = [item for resp in resps for item in (getattr(resp, "data", None) or [])]
            if not data:
                raise Malformed("no images in the answer")
            blobs = [b64decode_strict(getattr(item, "b64_json", None)) for item in data]
            images = await asyncio.to_thread(finish_images, blobs, job)
        except Malformed as exc:
            raise self._fail(exc, op) from None
        return ImageOutcome(images=images, model=model,
                            cost_usd=billed(self.name, model, self._image_cost(
                                resps, job, model, len(images))),
                            request_id=_request_id(resps[0]))

    def _image_cost(self, resps: list[Any], job: ImageJob, model: str, n: int
                    ) -> float | None:
        """What was billed: the token usage the answers report (gpt-image models), else
        the price table for as many images as came back."""
        usages = [u for resp in resps if (u := _image_usage(getattr(resp, "usage", None)))]
        if len(usages) == len(resps):
            cost = image_usage_cost(self.prices, self.settings, model,
                                    sum(u[0] for u in usages), sum(u[1] for u in usages),
                                    sum(u[2] for u in usages))
            if cost is not None:
                return cost
        return image_cost(self.prices, self.settings, model, job.quality, job.width,
                          job.height, n)

    # -- chat

    async def chat(self, job: ChatJob, model: str) -> ChatOutcome:
        messages = await asyncio.to_thread(openai_messages, job)
        extra: dict[str, Any] = {}
        if job.stop:
            extra["stop"] = list(job.stop)
        if job.seed is not None:
            extra["seed"] = job.seed
        try:
            resp = await self.client.chat.completions.create(
                model=self._upstream_model(model), messages=cast(Any, messages),
                max_completion_tokens=job.max_tokens, temperature=job.temperature,
                top_p=job.top_p, **extra)
        except Exception as exc:
            raise self._fail(exc, "chat.completions") from None
        try:
            choices = getattr(resp, "choices", None)
            if not isinstance(choices, list) or not choices:
                raise Malformed("no choices in the answer")
            choice = choices[0]
            message = getattr(choice, "message", None)
            if message is None:
                raise Malformed("no message in the answer")
            text = getattr(message, "content", None) or ""
            if not isinstance(text, str):
                raise Malformed("message content is not text")
        except Malformed as exc:
            raise self._fail(exc, "chat.completions") from None
        finish = getattr(choice, "finish_reason", None) or "stop"
        usage = getattr(resp, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        return ChatOutcome(
            text=text, finish_reason=str(finish), prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, model=model,
            cost_usd=billed(self.name, model, chat_cost(
                self.prices, self.settings, model, prompt_tokens, completion_tokens)),
            request_id=_request_id(resp))

    async def stream_chat(self, job: ChatJob, model: str) -> AsyncIterator[ChatChunk]:
        """The answer whole, as a stream of one piece (not yet token by token here)."""
        async for chunk in whole(await self.chat(job, model)):
            yield chunk

    async def close(self) -> None:
        await self.client.close()


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _image_usage(usage: object) -> tuple[int, int, int] | None:
    """(text input, image input, output) tokens an image answer reports; None if it
    reports none. Input without a breakdown is counted as text."""
    if usage is None:
        return None
    total_in = _int(getattr(usage, "input_tokens", None))
    details = getattr(usage, "input_tokens_details", None)
    image = _int(getattr(details, "image_tokens", None))
    text = _int(getattr(details, "text_tokens", None), total_in - image)
    return text, image, _int(getattr(usage, "output_tokens", None))


def _request_id(resp: object) -> str | None:
    rid = getattr(resp, "_request_id", None)
    return rid if isinstance(rid, str) else None


def openai_mask(mask: Image.Image) -> bytes:
    """The job's mask (L, 255 = repaint) as OpenAI's: a PNG transparent where to repaint."""
    rgba = Image.new("RGBA", mask.size, (0, 0, 0, 255))
    rgba.putalpha(mask.point(lambda v: 0 if v > 127 else 255))
    return png_bytes(rgba)


def image_data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def openai_messages(job: ChatJob) -> list[dict[str, Any]]:
    """HF-form messages -> OpenAI chat messages; each {"type": "image"} part takes the
    next of ``job.images`` as a PNG data URL. Text-only content becomes a string."""
    images = iter(job.images)
    out: list[dict[str, Any]] = []
    for message in job.messages:
        content = message.get("content")
        role = message.get("role", "user")
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image":
                image = next(images, None)
                if image is None:
                    raise ProviderError("openai", "client",
                                        "chat: more image parts than images")
                parts.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
        if all(p["type"] == "text" for p in parts):
            out.append({"role": role, "content": "\n".join(p["text"] for p in parts)})
        else:
            out.append({"role": role, "content": parts})
    return out
