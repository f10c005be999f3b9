"""OpenAI (or an OpenAI-compatible relay, or Azure OpenAI) as a cloud provider.

The official SDK does the talking, with its own retries off: Spillway's router retries
and fails over itself. Where requests go and with which key comes only from
``OpenAISettings``, never from a request. Every upstream failure leaves as a
``ProviderError`` whose message has been scrubbed of the key.

The helpers at the top (``fit_images``, ``scrub``, ``parse_retry_after``, ...) are shared
with the Gemini provider.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import io
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import httpx
import httpx2
import openai
from PIL import Image, ImageOps, UnidentifiedImageError

from server.config import OpenAISettings, Prices
from server.job import ImageJob
from server.providers.base import (
    ChatJob,
    ChatOutcome,
    FailureKind,
    ImageOutcome,
    OutImage,
    ProviderError,
)
from server.providers.local.images import MEDIA_TYPES, encode_image
from server.providers.pricing import openai_image_cost, openai_quality_tier, token_cost
from server.redact import REDACTED, redact

log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"

# ---------------------------------------------------------------- shared helpers

# What an upstream image may be, and how big, before we decode it.
UPSTREAM_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_UPSTREAM_PIXELS = 50_000_000

# Anything shaped like a cloud key, whoever's: OpenAI (sk-...), Google (AIza...).
_KEYLIKE = re.compile(r"(sk-[A-Za-z0-9_\-]{6,}|AIza[0-9A-Za-z_\-]{10,})")
_MAX_MESSAGE = 300

# Upstream calls never follow redirects. Whatever answers at the base URL (a relay, a
# hijacked name) could send us to another origin, and the SDKs' clients would take the key
# along: httpx drops only ``Authorization`` across origins, not Gemini's ``x-goog-api-key``
# nor Azure's ``api-key``. A 3xx is then an upstream failure (``kind_for_status``).
FOLLOW_REDIRECTS = False  # every upstream HTTP client is built with this

TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError, httpx.TimeoutException, httpx2.TimeoutException)
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    httpx.TransportError, httpx2.TransportError, ConnectionError)


class Malformed(Exception):
    """An upstream 200 whose content we cannot use."""


def scrub(text: str, secrets: Sequence[str] = ()) -> str:
    """The text without any of ``secrets`` in any disguise (case, reversal, base64,
    whitespace: server/redact.py) nor anything that looks like an API key, cut to a sane
    length."""
    text = redact(text, secrets)
    text = _KEYLIKE.sub(REDACTED, text)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            ms = float(raw_ms)
            if math.isfinite(ms) and ms >= 0:
                return ms / 1000.0
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        seconds = float(raw)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def decode_upstream_image(data: bytes) -> Image.Image:
    """An upstream picture, opened with a format allow-list and a pixel cap."""
    try:
        image = Image.open(io.BytesIO(data), formats=UPSTREAM_FORMATS)
        if image.width * image.height > MAX_UPSTREAM_PIXELS:
            raise Malformed(f"upstream image is {image.width}x{image.height}, too large")
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise Malformed(f"upstream image does not decode ({type(exc).__name__})") from None
    return image


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Exactly width x height: centre-cropped to the aspect, then resized (LANCZOS)."""
    if image.mode not in ("RGB", "RGBA"):
        has_alpha = "A" in image.mode or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def finish_images(blobs: Sequence[bytes], job: ImageJob) -> list[OutImage]:
    """Upstream bytes -> the job's size and format (blocking; run it in a thread)."""
    media_type = MEDIA_TYPES[job.output_format]
    out = []
    for blob in blobs:
        image = fit_image(decode_upstream_image(blob), job.width, job.height)
        out.append(OutImage(encode_image(image, job.output_format, job.output_compression),
                            media_type, seed=None))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def b64decode_strict(text: object) -> bytes:
    """Standard or URL-safe base64, padded or not; anything else is Malformed."""
    if not isinstance(text, str) or not text:
        raise Malformed("image data is missing")
    cleaned = "".join(text.split())
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        if "-" in cleaned or "_" in cleaned:
            return base64.urlsafe_b64decode(cleaned.encode("ascii"))
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise Malformed("image data is not base64") from None


def provider_error(provider: str, kind: FailureKind, message: str, secrets: Sequence[str], *,
                   status: int | None = None,
                   retry_after_s: float | None = None) -> ProviderError:
    return ProviderError(provider, kind, scrub(message, secrets), status=status,
                         retry_after_s=retry_after_s)


def kind_for_status(status: int) -> FailureKind:
    if 300 <= status < 400:
        # A redirect we did not follow (see FOLLOW_REDIRECTS): the upstream is misconfigured
        # or hostile, not the request; it counts against the upstream and fails over.
        return "server"
    if status in (401, 403):
        return "auth"
    if status == 429:
        return "rate_limited"
    if status == 408:
        return "timeout"
    if status >= 500:
        return "server"
    return "client"


# ---------------------------------------------------------------- OpenAI

# gpt-image sizes, by aspect (width / height)
GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536")

_Quality = Literal["low", "medium", "high"]


def nearest_shape(width: int, height: int, choices: tuple[str, ...], sep: str) -> str:
    """The choice ("1536x1024", "3:2"...) whose aspect is nearest width / height."""
    aspect = math.log(width / height)

    def distance(choice: str) -> float:
        w, h = (int(v) for v in choice.split(sep))
        return abs(math.log(w / h) - aspect)

    return min(choices, key=distance)


def nearest_size(width: int, height: int) -> str:
    """The gpt-image size whose aspect is nearest the job's."""
    return nearest_shape(width, height, GPT_IMAGE_SIZES, "x")


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

    def _error(self, exc: BaseException, op: str) -> ProviderError:
        secrets = self._secrets
        where = f"{op}: "
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, Malformed):
            return provider_error(self.name, "malformed", where + str(exc), secrets)
        if isinstance(exc, (openai.APITimeoutError, *TIMEOUT_ERRORS)):
            return provider_error(
                self.name, "timeout",
                f"{where}no answer within {self.settings.timeout_s:g} s", secrets)
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            kind = kind_for_status(status)
            retry_after = None
            if kind == "rate_limited":
                retry_after = parse_retry_after(exc.response.headers)
            detail = _error_detail(exc)
            message = f"{where}HTTP {status}" + (f": {detail}" if detail else "")
            return provider_error(self.name, kind, message, secrets, status=status,
                                  retry_after_s=retry_after)
        if isinstance(exc, openai.APIResponseValidationError):
            return provider_error(self.name, "malformed", f"{where}invalid response", secrets,
                                  status=exc.status_code)
        if isinstance(exc, (openai.APIConnectionError, *TRANSPORT_ERRORS)):
            return provider_error(self.name, "server",
                                  f"{where}connection failed ({type(exc).__name__})", secrets)
        if isinstance(exc, ValueError):  # JSON that does not parse, a model that won't build
            return provider_error(self.name, "malformed",
                                  f"{where}invalid response ({type(exc).__name__})", secrets)
        # Not a failure we know: say what it was (its type only; its text is not ours).
        log.warning("%s %s raised an unexpected %s", self.name, op, type(exc).__name__)
        return provider_error(self.name, "server", f"{where}{type(exc).__name__}", secrets)

    def _fail(self, exc: BaseException, op: str) -> ProviderError:
        err = self._error(exc, op)
        log.info("%s (kind=%s, status=%s)", err, err.kind, err.status)
        return err

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
        cost = openai_image_cost(self.prices, job.quality, size, len(images))
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
            cost_usd=token_cost(self.prices, model, prompt_tokens, completion_tokens),
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
