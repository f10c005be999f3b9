"""Wire models (OpenAI images API) and their conversion to and from jobs."""

from __future__ import annotations

import base64
import json
import math
import re
import secrets
import time
from dataclasses import replace
from typing import Any, Literal

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from server.config import ImageSettings
from server.errors import bad_request
from server.job import ImageJob
from server.wire import safejson

MAX_PROMPT_CHARS = 32000
MAX_SEED = 2**63 - 1
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")

# SDXL-Turbo gets sharper with a few more steps; quality names map onto them.
QUALITY_STEPS = {"low": 1, "standard": 1, "medium": 2, "high": 4, "hd": 4}
Quality = Literal["standard", "hd", "low", "medium", "high", "auto"]


class WireModel(BaseModel):
    """A request body that FastAPI (or a batch line) parsed: the whole input passes
    ``safejson.check`` first. JSON allows ``"\\ud800"``, which pydantic lets through a
    plain ``str`` and no encoder, database or tokenizer takes; a body nested deeper than
    any request needs is refused before anything walks it. One check over every string,
    nested ones and dict keys included, so no field can be forgotten."""

    @model_validator(mode="before")
    @classmethod
    def _valid_json(cls, data: Any) -> Any:
        try:
            safejson.check(data)
        except safejson.JSONError as exc:
            # A ValidationError raised here keeps its own location: the path safejson
            # found ("messages[0].content"), which the error handler names as the param.
            error = PydanticCustomError("invalid_text", "{message}",
                                        {"message": exc.message.rstrip(".")})
            raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                type=error, loc=(exc.path,) if exc.path else (), input=None)]) from None
        return data


class ImageGenerationRequest(WireModel):
    # Unknown fields are ignored, as newer SDKs add parameters (moderation, style...).
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int | None = Field(1, ge=1, le=10)
    size: str | None = "auto"
    quality: Quality | None = "auto"
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    stream: bool | None = None
    partial_images: int | None = Field(None, ge=0, le=3)
    user: str | None = None
    # Spillway extensions
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=4)
    # the decoder, where the image is made locally: the model's own VAE, or TAESDXL
    # (several times faster, a little softer); default: by quality (images.fast_qualities)
    vae: Literal["full", "tiny"] | None = None

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the prompt is empty")
        return v


class ImageEditRequest(ImageGenerationRequest):
    """The scalar fields of images/edits (multipart strings arrive coerced)."""

    strength: float | None = Field(None, ge=0.25, le=1.0)  # extension; 4 steps x 0.25 = 1


class ImageVariationRequest(WireModel):
    """The scalar fields of images/variations (multipart strings arrive coerced): OpenAI's
    and Spillway's extensions; any other is refused by name (a variation has no prompt)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    n: int | None = Field(1, ge=1, le=10)
    size: str | None = "auto"
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None
    # Spillway extensions
    output_format: Literal["png", "jpeg", "webp"] | None = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=4)
    strength: float | None = Field(None, ge=0.25, le=1.0)
    vae: Literal["full", "tiny"] | None = None

    def as_edit(self, limits: ImageSettings) -> ImageEditRequest:
        """The image-to-image request a variation is: no prompt (the job's is empty), at
        ``images.variation_strength`` unless it says its own."""
        fields = self.model_dump(exclude={"model"}, exclude_none=True)
        fields.setdefault("strength", limits.variation_strength)
        return ImageEditRequest.model_validate({**fields, "prompt": VARIATION})


VARIATION = "(a variation)"  # stands in for the prompt a variation does not have


def edit_size(size: str | None, source: tuple[int, int], limits: ImageSettings
              ) -> tuple[int, int]:
    """``auto`` keeps the source's aspect within the bounds, sides rounded to 8."""
    if size not in (None, "", "auto"):
        return parse_size(size, limits)
    w, h = source
    scale = min(1.0, limits.max_side / max(w, h))
    scale = max(scale, limits.min_side / min(w, h))
    return tuple(  # type: ignore[return-value]
        min(limits.max_side, max(limits.min_side, round(side * scale / 8) * 8)) for side in (w, h))


def fit_source(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An edit's source at the output size: cropped to its aspect, then resized. Pixel
    work: call it in the decoding worker thread (media.decode_image's ``fit``)."""
    return ImageOps.fit(image, size, Image.Resampling.LANCZOS)


def repaint_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """OpenAI's mask (fully transparent pixels mark what to repaint) as the pipeline's:
    mode L at ``size``, 255 where to repaint; cropped and scaled as the sources are.
    Pixel work: call it in the decoding worker thread."""
    alpha = mask.getchannel("A") if "A" in mask.getbands() else Image.new("L", mask.size, 255)
    repaint = alpha.point(lambda a: 255 if a == 0 else 0)
    fitted = ImageOps.fit(repaint, size, Image.Resampling.NEAREST)
    if fitted.getextrema()[1] == 0:
        raise bad_request("The mask has no fully transparent pixel, so nothing would be "
                          "repainted: make the area to change transparent (alpha 0).",
                          param="mask")
    return fitted


def to_edit_job(req: ImageEditRequest, model: str, limits: ImageSettings,
                sources: list[Image.Image], mask: Image.Image | None = None) -> ImageJob:
    """Sources are fitted (cropped to the aspect, then resized) to the output size."""
    base = to_image_job(req.model_copy(update={"size": "auto"}), model, limits)
    width, height = edit_size(req.size, sources[0].size, limits)
    # A mask repaints its area outright unless told otherwise; an edit moves halfway.
    strength = req.strength or (1.0 if mask is not None else limits.default_strength)
    needed = math.ceil(1 / strength - 1e-9)
    steps = req.steps or max(needed, QUALITY_STEPS.get(base.quality, limits.default_steps))
    if steps * strength < 1:
        raise bad_request(f"steps x strength = {steps} x {strength:g} is below 1, so no "
                          "denoising step would run; raise one of them.", param="strength")
    # Sources from intake (routes/images.py edit_sources) come fitted already.
    fitted = [im if im.size == (width, height) else fit_source(im, (width, height))
              for im in sources]
    if mask is not None and mask.size != (width, height):
        mask = ImageOps.fit(mask, (width, height), Image.Resampling.NEAREST)
    return replace(base, width=width, height=height, steps=min(steps, 4), init_images=fitted,
                   strength=strength, mask=mask)


def parse_size(size: str | None, limits: ImageSettings) -> tuple[int, int]:
    text = limits.default_size if size in (None, "", "auto") else str(size)
    m = _SIZE.match(text)
    if not m:
        raise bad_request(f"Invalid size {size!r}: use 'auto' or 'WIDTHxHEIGHT', e.g. '512x512'.",
                          param="size")
    width, height = int(m.group(1)), int(m.group(2))
    for side in (width, height):
        if not limits.min_side <= side <= limits.max_side:
            raise bad_request(f"Invalid size {size!r}: each side must be within "
                              f"{limits.min_side}..{limits.max_side}.", param="size")
        if side % 8:
            raise bad_request(f"Invalid size {size!r}: each side must be a multiple of 8.",
                              param="size")
    return width, height


def seeds_for(seed: int | None, n: int) -> list[int]:
    """A given seed s makes images s, s+1, ...; no seed draws fresh ones."""
    if seed is None:
        return [secrets.randbelow(2**32) for _ in range(n)]
    return [(seed + i) % (MAX_SEED + 1) for i in range(n)]


def check_stream(req: ImageGenerationRequest, job: ImageJob) -> None:
    """A streamed request's limits: its images come as base64 events, and partial images
    (the intermediate steps) are not made yet, so they are refused by name where a
    request could have them (one step has no intermediate image: just the final one)."""
    if req.response_format == "url":
        raise bad_request("A streamed answer carries its images as base64; omit "
                          "response_format or ask for b64_json.", param="response_format",
                          code="unsupported_value")
    if req.partial_images and job.steps > 1:
        raise bad_request(f"partial_images are not made by this server yet (this request "
                          f"runs {job.steps} steps); ask for 0, or stream without them.",
                          param="partial_images", code="unsupported_value")


def stream_events(kind: str, job: ImageJob, images: list[bytes]) -> list[str]:
    """The SSE events of a streamed answer (``kind``: image_generation or image_edit): one
    ``<kind>.completed`` per image, as OpenAI sends them. Local work bills no tokens."""
    usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
             "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}
    events = []
    for data in images:
        body = {"type": f"{kind}.completed", "b64_json": base64.b64encode(data).decode(),
                "created_at": int(time.time()), "size": f"{job.width}x{job.height}",
                "quality": job.quality if job.quality in ("low", "medium", "high") else "auto",
                "background": "opaque", "output_format": job.output_format, "usage": usage}
        events.append(f"event: {kind}.completed\ndata: "
                      f"{json.dumps(body, separators=(',', ':'))}\n\n")
    return events


def to_image_job(req: ImageGenerationRequest, model: str, limits: ImageSettings) -> ImageJob:
    if req.background == "transparent":
        raise bad_request("Transparent backgrounds are not supported by this model.",
                          param="background", code="unsupported_value")
    width, height = parse_size(req.size, limits)
    quality = req.quality or "auto"
    steps = req.steps or QUALITY_STEPS.get(quality, limits.default_steps)
    n = req.n or 1
    return ImageJob(
        model=model,
        prompt=req.prompt,
        seeds=seeds_for(req.seed, n),
        width=width,
        height=height,
        steps=steps,
        quality=quality,
        response_format=req.response_format or "b64_json",
        output_format=req.output_format or "png",
        output_compression=req.output_compression,
        user=req.user,
        vae=req.vae,
    )


def images_response(job: ImageJob, data: list[dict[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "created": int(time.time()),
        "data": data,
        "output_format": job.output_format,
        "size": f"{job.width}x{job.height}",
    }
    if job.quality in ("low", "medium", "high"):
        body["quality"] = job.quality
    return body
