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
from typing import Any, Literal, cast

import openai
from PIL import Image

from server.config import OpenAISettings, Prices
from server.job import ChatJob, ChatOutcome, ImageJob, ImageOutcome
from server.media.encode import png_bytes
from server.providers.base import ProviderError
from server.providers.pricing import (
    billed,
    nearest_size,
    openai_image_cost,
    openai_quality_tier,
    token_cost,
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
    when ``azure_endpoint`` is set)."""

    name = "openai"

    def __init__(self, settings: OpenAISettings, prices: Prices) -> None:
        key = settings.api_key.get_secret_value() if settings.api_key is not None else ""
        if not key:
            raise ValueError("OpenAI is not configured: no api_key")
        self.settings = settings
        self.prices = prices
        self._secrets = (key,)
        self._azure = settings.azure_endpoint is not None
        # The SDK's own client class (its timeouts and pool limits), but not its
        # follow_redirects=True; closed by ``self.client.close()``.
        http_client = openai.DefaultAsyncHttpxClient(follow_redirects=FOLLOW_REDIRECTS)
        self.client: openai.AsyncOpenAI
        if settings.azure_endpoint is not None:
            self.client = openai.AsyncAzureOpenAI(
                api_key=key, azure_endpoint=settings.azure_endpoint,
                api_version=settings.azure_api_version, organization=settings.organization,
                max_retries=0, timeout=settings.timeout_s, http_client=http_client)
        else:
            # base_url is always passed, so OPENAI_BASE_URL in the environment is ignored.
            self.client = openai.AsyncOpenAI(
                api_key=key, base_url=settings.base_url or OPENAI_BASE_URL,
                organization=settings.organization, max_retries=0,
                timeout=settings.timeout_s, http_client=http_client)

    def _upstream_model(self, model: str) -> str:
        """Azure addresses deployments: the configured one for this model, or the name."""
        if self._azure:
            return self.settings.azure_deployments.get(model, model)
        return model

    # -- errors

    def _fail(self, exc: BaseException, op: str) -> ProviderError:
        return failed(classify(self.name, exc, op, self._secrets, self.settings.timeout_s,
                               read_status=_status_failure,
                               timeouts=(openai.APITimeoutError,),
                               transports=(openai.APIConnectionError,)))

    # -- images

    async def generate_images(self, job: ImageJob, model: str) -> ImageOutcome:
        size = nearest_size(job.width, job.height)
        try:
            resp = await self.client.images.generate(
                model=self._upstream_model(model), prompt=job.prompt, n=job.n, size=size,
                quality=upstream_quality(job.quality), output_format="png")
        except Exception as exc:
            raise self._fail(exc, "images.generate") from None
        return await self._image_outcome(resp, job, model, size, "images.generate")

    async def edit_images(self, job: ImageJob, model: str) -> ImageOutcome:
        if not job.init_images:
            raise ProviderError(self.name, "client", "images.edit: no source image")
        size = nearest_size(job.width, job.height)
        pngs = await asyncio.to_thread(lambda: [png_bytes(im) for im in job.init_images])
        files = [(f"image_{i}.png", data, "image/png") for i, data in enumerate(pngs)]
        image: Any = files[0] if len(files) == 1 else files
        try:
            resp = await self.client.images.edit(
                model=self._upstream_model(model), image=image, prompt=job.prompt, n=job.n,
                size=size, quality=upstream_quality(job.quality), output_format="png")
        except Exception as exc:
            raise self._fail(exc, "images.edit") from None
        return await self._image_outcome(resp, job, model, size, "images.edit")

    async def _image_outcome(self, resp: object, job: ImageJob, model: str, size: str,
                             op: str) -> ImageOutcome:
        try:
            data = getattr(resp, "data", None)
            if not isinstance(data, list) or not data:
                raise Malformed("no images in the answer")
            blobs = [b64decode_strict(getattr(item, "b64_json", None)) for item in data]
            images = await asyncio.to_thread(finish_images, blobs, job)
        except Malformed as exc:
            raise self._fail(exc, op) from None
        # Price what was billed: as many images as came back.
        cost = openai_image_cost(self.prices, job.quality, size, len(images), model)
        return ImageOutcome(images=images, model=model, cost_usd=cost,
                            request_id=_request_id(resp))

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
            cost_usd=billed(self.name, model, token_cost(
                self.prices, self.name, model, prompt_tokens, completion_tokens)),
            request_id=_request_id(resp))

    async def close(self) -> None:
        await self.client.close()


def _request_id(resp: object) -> str | None:
    rid = getattr(resp, "_request_id", None)
    return rid if isinstance(rid, str) else None


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
