"""What every cloud upstream shares: its images decoded and fitted to the job, keys
scrubbed from its messages, its Retry-After read, and its failures classified into one
``ProviderError`` (``classify``; each provider says how its SDK reports an HTTP status)."""

from __future__ import annotations

import base64
import binascii
import email.utils
import io
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import httpx
import httpx2
from PIL import Image, UnidentifiedImageError

from server.job import ImageJob, OutImage
from server.media.encode import MEDIA_TYPES, encode_image, fit_image
from server.providers.base import FailureKind, ProviderError
from server.redact import REDACTED, redact

log = logging.getLogger(__name__)

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


def finish_images(blobs: Sequence[bytes], job: ImageJob) -> list[OutImage]:
    """Upstream bytes -> the job's size and format (blocking; run it in a thread)."""
    media_type = MEDIA_TYPES[job.output_format]
    out = []
    for blob in blobs:
        image = fit_image(decode_upstream_image(blob), job.width, job.height)
        out.append(OutImage(encode_image(image, job.output_format, job.output_compression),
                            media_type, seed=None))
    return out


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


@dataclass(frozen=True)
class StatusFailure:
    """An upstream answer that failed, as its SDK reports it."""

    status: int
    kind: FailureKind
    message: str
    retry_after_s: float | None = None


def classify(provider: str, exc: BaseException, op: str, secrets: Sequence[str],
             timeout_s: float, *, read_status: Callable[[BaseException], StatusFailure | None],
             timeouts: tuple[type[BaseException], ...] = (),
             transports: tuple[type[BaseException], ...] = ()) -> ProviderError:
    """Any exception of an upstream call as the ``ProviderError`` the router acts on
    (``kind`` says whether it trips the breaker, is rate limiting, or is the request's
    fault); its message scrubbed of ``secrets``."""
    where = f"{op}: "
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, Malformed):
        return provider_error(provider, "malformed", where + str(exc), secrets)
    if isinstance(exc, (*timeouts, *TIMEOUT_ERRORS)):
        return provider_error(provider, "timeout", f"{where}no answer within {timeout_s:g} s",
                              secrets)
    failure = read_status(exc)
    if failure is not None:
        return provider_error(provider, failure.kind, where + failure.message, secrets,
                              status=failure.status or None,
                              retry_after_s=failure.retry_after_s)
    if isinstance(exc, (*transports, *TRANSPORT_ERRORS)):
        return provider_error(provider, "server",
                              f"{where}connection failed ({type(exc).__name__})", secrets)
    if isinstance(exc, ValueError):  # JSON that does not parse, a model that won't build
        return provider_error(provider, "malformed",
                              f"{where}invalid response ({type(exc).__name__})", secrets)
    # Not a failure we know: say what it was (its type only; its text is not ours).
    log.warning("%s %s raised an unexpected %s", provider, op, type(exc).__name__)
    return provider_error(provider, "server", f"{where}{type(exc).__name__}", secrets)


def failed(err: ProviderError) -> ProviderError:
    log.info("%s (kind=%s, status=%s)", err, err.kind, err.status)
    return err
