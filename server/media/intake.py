"""Image intake: the one way images enter the server (uploads, data URLs, http(s) URLs).

Every refusal is an ``APIError(400, ...)`` carrying ``param`` and a specific ``code``; nothing
here should ever surface as a 500 or hang.

Fetching http(s) URLs is server/media/fetch.py (the SSRF-safe fetcher).

Decoding is Pillow with a format allow-list and a pixel cap checked before any pixel is
allocated (decompression bombs), in a worker thread that also fits the image to its use,
within the server's budget of pixels decoded at once (server/media/budget.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from PIL import Image, ImageOps

from server.config import MediaSettings
from server.errors import APIError
from server.media.budget import PixelBudget
from server.media.fetch import fetch_url, refuse, scheme_of, show

log = logging.getLogger(__name__)

Fit = Callable[[Image.Image], Image.Image]  # a decoded image -> what it is used at
T = TypeVar("T")

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_FORMATS_TEXT = "PNG, JPEG, WEBP or GIF"

_BASE64_BAD_CHAR = re.compile(r"[^A-Za-z0-9+/_=-]")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


# ---------------------------------------------------------------------------------------
# public API


async def load_image(ref: str, media: MediaSettings, *, param: str = "image_url",
                     budget: PixelBudget | None = None, fit: Fit | None = None,
                     mode: str = "RGB") -> Image.Image:
    """An RGB image from a data URL or an http(s) URL: ``decode_image`` of its bytes."""
    scheme = scheme_of(ref)
    if scheme == "data":
        # base64 is CPU work too: off the event loop.
        data = await asyncio.to_thread(decode_data_url, ref, media, param=param)
    elif scheme in ("http", "https"):
        data = await fetch_url(ref, media, param=param)
    elif scheme is None:
        raise refuse(param, f"{show(ref)} is not a URL; send an http(s) URL or a "
                      "data:image/...;base64 URL.", "invalid_image_url")
    else:
        raise refuse(param, f"the URL scheme {show(scheme)} is not accepted; use http, "
                      "https or data.", "invalid_image_url")
    return await decode_image(data, media, param=param, budget=budget, fit=fit, mode=mode)


async def decode_image(data: bytes, media: MediaSettings, *, param: str = "image",
                       budget: PixelBudget | None = None, fit: Fit | None = None,
                       mode: str = "RGB") -> Image.Image:
    """Decode ``data`` and ``fit`` the result (scale it to what it is for) in one worker-
    thread step, so the full-size pixels are dropped as soon as they are fitted; never on
    the event loop. With a ``budget`` (the server's: ``AppState.pixels``) the step waits
    until the image's pixels fit in what all requests may hold decoded at once."""
    if budget is None:
        return await asyncio.to_thread(decode_image_bytes, data, media, param=param, fit=fit,
                                       mode=mode)
    width, height = await asyncio.to_thread(image_size, data, media, param=param)
    return await budget.run(width * height, functools.partial(
        decode_image_bytes, data, media, param=param, fit=fit, mode=mode), param=param)


def image_size(data: bytes, media: MediaSettings, *, param: str = "image") -> tuple[int, int]:
    """Width and height from the header alone, within the caps: what decoding will cost."""
    _check_encoded(data, media, param)
    try:
        return _open_checked(data, media, param).size
    except APIError:
        raise
    except Exception as exc:
        log.debug("image header unreadable: %r", exc)
        raise refuse(param, "the image could not be decoded (truncated or corrupt).",
                      "invalid_image") from None


async def load_all(loads: Iterable[Awaitable[T]]) -> list[T]:
    """All of a request's images, or its first refusal; then the rest stop waiting for
    (and holding a place in) the pixel budget at once."""
    tasks = [asyncio.ensure_future(load) for load in loads]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def check_count(count: int, media: MediaSettings, *, param: str) -> None:
    """At most ``max_images_per_request`` images in one request, whatever the API."""
    limit = media.max_images_per_request
    if count > limit:
        raise APIError(400, f"{count} images in one request; the limit is {limit}.",
                       param=param, code="too_many_images")


def decode_image_bytes(data: bytes, media: MediaSettings, *, param: str = "image",
                       fit: Fit | None = None, mode: str = "RGB") -> Image.Image:
    """Decode an encoded image (PNG, JPEG, WEBP, GIF first frame) to RGB (or ``mode``:
    RGBA for a mask, whose transparency is what it says), within the caps, then ``fit``
    it. Blocking: call it from a worker thread (``decode_image``)."""
    sniffed = _check_encoded(data, media, param)
    try:
        image = _open_checked(data, media, param)
        # Pillow reports malformed files with many exception types (OSError, SyntaxError,
        # ValueError, struct.error, zlib.error, ...); any of them means "bad image", not a
        # server fault. APIError (our own pixel refusal) passes through untouched.
        image.load()
        # In place, and no convert() of what is RGB already: each copy of a 40M-pixel
        # image is 120 MB more at the peak.
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode != mode:
            image = image.convert(mode)
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise refuse(param, "the image has too many pixels.", "image_too_large") from None
    except Exception as exc:
        log.debug("image decode failed: %r", exc)
        raise refuse(param, f"the {sniffed} image could not be decoded (truncated or "
                      "corrupt).", "invalid_image") from None
    return image if fit is None else fit(image)


def _check_encoded(data: bytes, media: MediaSettings, param: str) -> str:
    """The caps on the encoded bytes; returns the format they are."""
    if len(data) > media.max_bytes:
        raise refuse(param, f"the image is {len(data)} bytes; the limit is "
                      f"{media.max_bytes}.", "image_too_large")
    if not data:
        raise refuse(param, "the image is empty.", "invalid_image")
    sniffed = _sniff_format(data)
    if sniffed not in ALLOWED_FORMATS:
        what = f"a {sniffed} file" if sniffed else "not a recognised image"
        raise refuse(param, f"the data is {what}; only {_FORMATS_TEXT} images are "
                      "accepted.", "unsupported_image_format")
    return sniffed


def decode_data_url(url: str, media: MediaSettings, *, param: str = "image_url") -> bytes:
    """The bytes of a ``data:<mime>[;...];base64,<payload>`` URL."""
    if url[:5].lower() != "data:":
        raise refuse(param, f"{show(url)} is not a data URL.", "invalid_image_url")
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise refuse(param, f"the data URL {show(header)} has no ',' before its data.",
                      "invalid_image_url")
    params = header.split(";")
    if len(params) < 2 or params[-1].strip().lower() != "base64":
        raise refuse(param, f"the data URL header {show('data:' + header)} must end in "
                      "';base64'; only base64-encoded images are accepted.",
                      "invalid_image_url")
    if "%" in payload:
        # RFC 2397 payloads may be percent-encoded (some clients encode '+', '/', '=').
        payload = urllib.parse.unquote(payload)
    return decode_base64(payload, media.max_bytes, param=param)


def decode_base64(data: str, max_bytes: int, *, param: str) -> bytes:
    """Standard or URL-safe base64, padding optional; anything else is refused."""
    # Cheap bound first, so a huge payload is refused before it is scanned or copied.
    if len(data) // 4 * 3 > max_bytes + 3:
        raise refuse(param, f"the encoded image is about {len(data) // 4 * 3} bytes; the "
                      f"limit is {max_bytes}.", "image_too_large")
    bad = _BASE64_BAD_CHAR.search(data)
    if bad is not None:
        raise refuse(param, f"the base64 data has an invalid character {bad.group()!r} at "
                      f"position {bad.start()}.", "invalid_image")
    body = data.rstrip("=")
    if "=" in body:
        raise refuse(param, "the base64 data has '=' padding before its end.",
                      "invalid_image")
    if not body:
        raise refuse(param, "the base64 data is empty.", "invalid_image")
    if len(body) % 4 == 1:  # no whole byte fits in 6 bits: the data was cut off
        raise refuse(param, "the base64 data is truncated (its length is not valid).",
                      "invalid_image")
    padded = body.translate(_URLSAFE_TO_STANDARD) + "=" * (-len(body) % 4)
    try:
        decoded = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise refuse(param, "the data is not valid base64.", "invalid_image") from None
    if len(decoded) > max_bytes:
        raise refuse(param, f"the image is {len(decoded)} bytes; the limit is {max_bytes}.",
                      "image_too_large")
    return decoded


# ---------------------------------------------------------------------------------------
# decoding helpers


def _sniff_format(data: bytes) -> str | None:
    """The format named by the magic bytes; also names common refused ones for messages."""
    head = data[:64]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<svg", b"<?xml", b"<!doctype svg")):
        return "SVG"
    return None


def _open_checked(data: bytes, media: MediaSettings, param: str) -> Image.Image:
    """Open lazily (header only) and check the size before any pixel is decoded."""
    image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    width, height = image.size
    if width <= 0 or height <= 0:
        raise refuse(param, f"the image is {width}x{height} pixels.", "invalid_image")
    if width * height > media.max_pixels:
        raise refuse(param, f"the image is {width}x{height} = {width * height} pixels; the "
                      f"limit is {media.max_pixels}.", "image_too_large")
    return image
