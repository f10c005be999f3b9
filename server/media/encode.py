"""Pictures out: PNG, JPEG or WebP bytes at the asked quality, and an image fitted to an
exact size."""

from __future__ import annotations

import io

from PIL import Image, ImageOps

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: Image.Image, fmt: str, compression: int | None) -> bytes:
    """PNG at a fast compression level; JPEG/WebP at the asked quality (default 100)."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=compression or 100)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=compression or 100)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buf.getvalue()


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Exactly width x height: centre-cropped to the aspect, then resized (LANCZOS)."""
    if image.mode not in ("RGB", "RGBA"):
        has_alpha = "A" in image.mode or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
