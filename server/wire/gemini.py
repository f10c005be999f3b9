"""The Gemini wire format (``models/{model}:generateContent``): parsing and responses.

Pure functions only. A request becomes a ``GeminiAsk``: messages in the same HF form the
OpenAI chat parser makes, image sources as ``ImageRef`` (inline data as a data URL), so
the route hands both to the shared intake and the shared router. Google's JSON is
camelCase, but clients also send snake_case (the python SDK mixes them): both are read.
"""

from __future__ import annotations

import base64
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipelines.vlm import ChatResult, Message
from server.catalog import Listed, gemini_image_by_name
from server.config import ImageSettings
from server.errors import APIError, bad_request
from server.wire.openai_chat import ImageRef, text_value

ROLES = {"user": "user", "model": "assistant"}
MODALITIES = {"TEXT", "IMAGE"}
MAX_CANDIDATES = 8
FINISH = {"stop": "STOP", "length": "MAX_TOKENS"}


def _get(d: dict[str, Any], camel: str) -> Any:
    """``d[camel]``, else the snake_case spelling of it."""
    if camel in d:
        return d[camel]
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
    return d.get(snake)


@dataclass(frozen=True)
class GenerationConfig:
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    candidate_count: int = 1
    modalities: frozenset[str] = frozenset()
    aspect_ratio: str | None = None


@dataclass(frozen=True)
class GeminiAsk:
    messages: list[Message]
    sources: list[ImageRef] = field(default_factory=list)
    config: GenerationConfig = GenerationConfig()

    @property
    def prompt(self) -> str:
        """The text of the last user turn: what an image is generated from."""
        for message in reversed(self.messages):
            if message["role"] == "user":
                return " ".join(p["text"] for p in message["content"] if p["type"] == "text")
        return ""


# google.ai.generativelanguage's Modality enum, by number.
MODALITY_NUMBERS = {0: "MODALITY_UNSPECIFIED", 1: "TEXT", 2: "IMAGE", 3: "AUDIO"}


def _number(value: Any, param: str, lo: float, hi: float, *, integer: bool = False
            ) -> float | int | None:
    if value is None:
        return None
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or (
            not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a number"
        raise bad_request(f"{param} must be {kind}.", param=param)
    if not lo <= value <= hi:
        raise bad_request(f"{param} is {value}; it must be between {lo:g} and {hi:g}.",
                          param=param)
    return value


def parse_config(raw: Any) -> GenerationConfig:
    where = "generationConfig"
    if raw is None:
        return GenerationConfig()
    if not isinstance(raw, dict):
        raise bad_request(f"{where} must be an object.", param=where)
    stops = _get(raw, "stopSequences") or []
    if not isinstance(stops, list) or len(stops) > 5 or not all(
            isinstance(s, str) and s for s in stops):
        raise bad_request("stopSequences takes up to 5 non-empty strings.",
                          param=f"{where}.stopSequences")
    for i, stop in enumerate(stops):
        text_value(stop, f"{where}.stopSequences[{i}]")
    modalities = _get(raw, "responseModalities") or []
    if not isinstance(modalities, list) or not all(
            isinstance(m, str) or (isinstance(m, int) and not isinstance(m, bool))
            for m in modalities):
        raise bad_request("responseModalities must be a list such as [\"TEXT\", \"IMAGE\"].",
                          param=f"{where}.responseModalities")
    # The REST transport's enum-encoding=int sends the enum's numbers (Modality: 1 TEXT,
    # 2 IMAGE, 3 AUDIO); an unknown number is refused below by the name it does not have.
    upper = frozenset(MODALITY_NUMBERS.get(m, f"MODALITY_{m}") if isinstance(m, int)
                      else m.upper() for m in modalities)
    if not upper <= MODALITIES:
        raise bad_request(f"responseModalities {sorted(upper - MODALITIES)} are not "
                          "supported; use TEXT and/or IMAGE.",
                          param=f"{where}.responseModalities")
    image_config = _get(raw, "imageConfig") or {}
    if not isinstance(image_config, dict):
        raise bad_request("imageConfig must be an object.", param=f"{where}.imageConfig")
    aspect = _get(image_config, "aspectRatio")
    if aspect is not None and aspect_of(aspect) is None:
        raise bad_request(f"aspectRatio {str(aspect)[:20]!r} is not W:H such as \"16:9\".",
                          param=f"{where}.imageConfig.aspectRatio")
    max_tokens = _number(_get(raw, "maxOutputTokens"), f"{where}.maxOutputTokens", 1, 2**31,
                         integer=True)
    seed = _number(_get(raw, "seed"), f"{where}.seed", -(2**31), 2**32 - 1, integer=True)
    count = _number(_get(raw, "candidateCount"), f"{where}.candidateCount", 1, MAX_CANDIDATES,
                    integer=True)
    return GenerationConfig(
        max_output_tokens=None if max_tokens is None else int(max_tokens),
        temperature=_number(_get(raw, "temperature"), f"{where}.temperature", 0, 2),
        top_p=_number(_get(raw, "topP"), f"{where}.topP", 0, 1),
        stop=tuple(stops),
        seed=None if seed is None else int(seed) % 2**32,  # Gemini seeds may be negative
        candidate_count=int(count or 1),
        modalities=upper,
        aspect_ratio=aspect)


def aspect_of(text: Any) -> tuple[int, int] | None:
    if not isinstance(text, str):
        return None
    w, colon, h = text.partition(":")
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not colon or not (w.isascii() and w.isdigit() and h.isascii() and h.isdigit()):
        return None
    a, b = int(w), int(h)
    return (a, b) if 0 < a <= 64 and 0 < b <= 64 and max(a, b) / min(a, b) <= 8 else None


def size_for(aspect_ratio: str | None, limits: ImageSettings) -> str:
    """A ``WxH`` of the default size's area at the asked aspect, in multiples of 64 and
    within the server's side limits."""
    dw, _, dh = limits.default_size.partition("x")
    area = int(dw) * int(dh)
    a, b = aspect_of(aspect_ratio) or (1, 1)
    width = math.sqrt(area * a / b)
    height = area / width

    def side(x: float) -> int:
        snapped = max(64, round(x / 64) * 64)
        return min(limits.max_side, max(limits.min_side, snapped)) // 8 * 8

    return f"{side(width)}x{side(height)}"


def _blob(part: dict[str, Any], where: str) -> ImageRef:
    inline = _get(part, "inlineData")
    if inline is not None:
        if not isinstance(inline, dict) or not isinstance(inline.get("data"), str):
            raise bad_request("inlineData needs a base64 'data' string and a 'mimeType'.",
                              param=f"{where}.inlineData")
        mime = _get(inline, "mimeType")
        if not isinstance(mime, str) or not mime.lower().startswith("image/"):
            raise bad_request(f"inlineData of type {str(mime)[:40]!r} is not supported; "
                              "only images are.", param=f"{where}.inlineData.mimeType")
        # The shared intake reads data URLs: standard or URL-safe base64, size-capped.
        return ImageRef(f"data:{mime};base64,{inline['data']}", "auto", f"{where}.inlineData")
    file_data = _get(part, "fileData")
    if not isinstance(file_data, dict) or not isinstance(_get(file_data, "fileUri"), str):
        raise bad_request("fileData needs a 'fileUri' string.", param=f"{where}.fileData")
    return ImageRef(str(_get(file_data, "fileUri")), "auto", f"{where}.fileData.fileUri")


def _content(raw: Any, where: str, sources: list[ImageRef]) -> Message:
    if not isinstance(raw, dict):
        raise bad_request("Each content must be an object with 'role' and 'parts'.",
                          param=where)
    role_name = raw.get("role") or "user"
    role = ROLES.get(role_name) if isinstance(role_name, str) else None
    if role is None:
        raise bad_request(f"Unsupported role {str(role_name)[:20]!r}: use user or model.",
                          param=f"{where}.role")
    parts = raw.get("parts")
    if not isinstance(parts, list) or not parts:
        raise bad_request("parts must be a non-empty list.", param=f"{where}.parts")
    out: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        pwhere = f"{where}.parts[{j}]"
        if not isinstance(part, dict):
            raise bad_request("Each part must be an object.", param=pwhere)
        if "thought" in part and part.get("thought"):
            continue  # thought summaries from an earlier answer carry no input
        if "text" in part:
            out.append({"type": "text", "text": text_value(part["text"], f"{pwhere}.text")})
        elif any(_get(part, k) is not None for k in ("inlineData", "fileData")):
            if role != "user":
                raise bad_request("Images are accepted in user turns only.", param=pwhere)
            sources.append(_blob(part, pwhere))
            out.append({"type": "image"})
        else:
            kinds = ", ".join(sorted(k for k in part if k != "thoughtSignature"))[:60]
            raise bad_request(f"Unsupported part ({kinds or 'empty'}): send text, inlineData "
                              "or fileData.", param=pwhere)
    return {"role": role, "content": out}


def parse_request(raw: Any) -> GeminiAsk:
    if not isinstance(raw, dict):
        raise bad_request("The request body must be a JSON object.")
    contents = raw.get("contents")
    if not isinstance(contents, list) or not contents:
        raise bad_request("contents must be a non-empty list.", param="contents")
    sources: list[ImageRef] = []
    messages: list[Message] = []
    system = _get(raw, "systemInstruction")
    if system is not None:
        # No image in a system instruction: it is text only.
        found: list[ImageRef] = []
        message = _content({**system, "role": "user"} if isinstance(system, dict) else system,
                           "systemInstruction", found)
        if found:
            raise bad_request("systemInstruction takes text parts only.",
                              param="systemInstruction")
        messages.append({"role": "system", "content": message["content"]})
    for i, content in enumerate(contents):
        messages.append(_content(content, f"contents[{i}]", sources))
    if messages[-1]["role"] != "user":
        raise bad_request("The last content must be from the user.", param="contents")
    return GeminiAsk(messages, sources, parse_config(_get(raw, "generationConfig")))


def wants_image(model: str, config: GenerationConfig) -> bool:
    """Image output when asked for, or by default from an image model."""
    if config.modalities:
        return "IMAGE" in config.modalities
    return gemini_image_by_name(model)


def model_entry(model: Listed) -> dict[str, Any]:
    """A Gemini ``Model`` resource, as ``models.get`` and ``models.list`` return it."""
    return {"name": f"models/{model.name}", "baseModelId": model.name, "version": "spillway",
            "displayName": model.display, "description": model.description,
            "inputTokenLimit": model.input_limit, "outputTokenLimit": model.output_limit,
            "supportedGenerationMethods": list(model.methods)}


def response_id() -> str:
    return uuid.uuid4().hex[:24]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"promptTokenCount": prompt_tokens, "candidatesTokenCount": completion_tokens,
            "totalTokenCount": prompt_tokens + completion_tokens}


def text_response(text: str | None, finish: str | None, prompt_tokens: int,
                  completion_tokens: int, model: str, rid: str) -> dict[str, Any]:
    """A GenerateContentResponse with one text candidate (or, streaming, one delta of it:
    ``finish=None`` until the last chunk)."""
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": []}, "index": 0}
    if text is not None:
        candidate["content"]["parts"].append({"text": text})
    if finish is not None:
        candidate["finishReason"] = FINISH.get(finish, "OTHER")
    body: dict[str, Any] = {"candidates": [candidate], "modelVersion": model,
                            "responseId": rid, "createTime": _now()}
    if finish is not None:
        body["usageMetadata"] = _usage(prompt_tokens, completion_tokens)
    return body


def images_response(images: list[tuple[str, bytes]], model: str, rid: str,
                    prompt_tokens: int = 0) -> dict[str, Any]:
    """One candidate per image, each a single inlineData part (standard base64, as
    Google's API sends)."""
    candidates = [{"content": {"role": "model", "parts": [
                       {"inlineData": {"mimeType": mime,
                                       "data": base64.b64encode(data).decode("ascii")}}]},
                   "finishReason": "STOP", "index": i}
                  for i, (mime, data) in enumerate(images)]
    return {"candidates": candidates, "modelVersion": model, "responseId": rid,
            "createTime": _now(), "usageMetadata": _usage(prompt_tokens, 0)}


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\r\n\r\n"


class GeminiChunks:
    """``streamGenerateContent?alt=sse``: one GenerateContentResponse per event, the last
    with the finish reason and usage; no end marker."""

    media_type = "text/event-stream"

    def __init__(self, model: str, rid: str) -> None:
        self.model, self.rid = model, rid

    def opening(self) -> list[str]:
        return []

    def delta(self, text: str) -> str:
        return sse(text_response(text, None, 0, 0, self.model, self.rid))

    def closing(self, result: ChatResult) -> list[str]:
        return [sse(text_response("", result.finish_reason, result.prompt_tokens,
                                  result.completion_tokens, self.model, self.rid))]

    def error(self, err: APIError) -> str:
        return sse(gemini_body(err))

    def ending(self) -> list[str]:
        return []


class GeminiJsonArray:
    """``streamGenerateContent`` without ``alt=sse`` (or with ``alt=json``): the same
    GenerateContentResponse objects as one JSON array, sent as they come, as Google's REST
    API does."""

    media_type = "application/json"

    def __init__(self, model: str, rid: str) -> None:
        self.model, self.rid = model, rid
        self._sent = 0

    def _item(self, body: dict[str, Any]) -> str:
        self._sent += 1
        return ("[" if self._sent == 1 else ",\r\n") + json.dumps(body, separators=(",", ":"))

    def opening(self) -> list[str]:
        return []

    def delta(self, text: str) -> str:
        return self._item(text_response(text, None, 0, 0, self.model, self.rid))

    def closing(self, result: ChatResult) -> list[str]:
        return [self._item(text_response("", result.finish_reason, result.prompt_tokens,
                                         result.completion_tokens, self.model, self.rid))]

    def error(self, err: APIError) -> str:
        return self._item(gemini_body(err))

    def ending(self) -> list[str]:
        return ["]" if self._sent else "[]"]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT",
                  429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                  501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
                  507: "UNAVAILABLE"}


def gemini_body(err: APIError) -> dict[str, Any]:
    """``{error: {code, message, status}}``; a 429 carries RetryInfo, as Google's does."""
    body: dict[str, Any] = {"code": err.status, "message": err.message,
                            "status": _GOOGLE_STATUS.get(err.status, "UNKNOWN")}
    details: list[dict[str, Any]] = []
    retry = err.headers.get("Retry-After")
    if err.status == 429 and retry is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{retry}s"})
    if err.code is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": err.code.upper(), "domain": "spillway",
                        "metadata": {"param": err.param} if err.param else {}})
    if details:
        body["details"] = details
    return {"error": body}
