"""Wire models for /v1/chat/completions and their conversion to a ChatItem."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field

from pipelines.vlm import ChatResult, Message
from server.errors import APIError, bad_request
from server.wire.openai_images import WireModel

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DETAILS = ("low", "high", "auto")


class StreamOptions(WireModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = None


class ChatRequest(WireModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int | None = Field(None, ge=1, le=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


@dataclass(frozen=True)
class ImageRef:
    url: str
    detail: str
    param: str  # where it was, for error messages: messages[0].content[1].image_url


@dataclass(frozen=True)
class ParsedChat:
    messages: list[Message]  # HF chat format; images as {"type": "image"} parts
    images: list[ImageRef]


def text_value(value: Any, param: str, need: str = "text must be a string.") -> str:
    """A text field of a request, as a tokenizer can take it. JSON allows ``\\ud800``,
    a lone surrogate no encoder accepts: it gets a 400 here, not a 500 in the model."""
    if not isinstance(value, str):
        raise bad_request(need, param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"Invalid text: a lone surrogate (\\u{ord(value[exc.start]):04x}) "
                          f"at character {exc.start} is not a Unicode character.",
                          param=param) from None
    return value


def _text_of(part: dict[str, Any], where: str) -> str:
    return text_value(part.get("text"), where, "A text part needs a string 'text'.")


def _image_of(part: dict[str, Any], where: str) -> ImageRef:
    spec = part.get("image_url")
    if isinstance(spec, str):
        spec = {"url": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("url"), str) or not spec["url"]:
        raise bad_request("An image_url part needs image_url.url.", param=f"{where}.image_url")
    detail = spec.get("detail") or "auto"
    if detail not in DETAILS:
        raise bad_request(f"image_url.detail must be one of {', '.join(DETAILS)}, "
                          f"not {str(detail)[:20]!r}.", param=f"{where}.image_url.detail")
    return ImageRef(spec["url"], detail, f"{where}.image_url")


def parse_messages(raw: list[dict[str, Any]]) -> ParsedChat:
    messages: list[Message] = []
    images: list[ImageRef] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        role = ROLES.get(str(msg.get("role")))
        if role is None:
            raise bad_request(f"Unsupported role {str(msg.get('role'))[:20]!r}: use system, "
                              "developer, user or assistant.", param=f"{where}.role")
        content = msg.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            text = text_value(content, f"{where}.content")
            messages.append({"role": role, "content": [{"type": "text", "text": text}]})
            continue
        if not isinstance(content, list) or not content:
            raise bad_request("Message content must be a string or a non-empty list of parts.",
                              param=f"{where}.content")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": _text_of(part, pwhere)})
            elif kind == "image_url" and role == "user":
                images.append(_image_of(part, pwhere))
                parts.append({"type": "image"})
            else:
                raise bad_request(f"Unsupported content part type {str(kind)[:20]!r} for role "
                                  f"{role!r}.", param=f"{pwhere}.type")
        messages.append({"role": role, "content": parts})
    return ParsedChat(messages, images)


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if len(items) > 4 or any(not s for s in items):
        raise bad_request("stop takes up to 4 non-empty strings.", param="stop")
    return tuple(items)


def max_tokens_of(req: ChatRequest, default: int, cap: int) -> int:
    asked = req.max_completion_tokens or req.max_tokens or default
    if asked > cap:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise bad_request(f"{param} is {asked}; this server allows at most {cap}.", param=param)
    return asked


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def usage(result: ChatResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion_body(cid: str, model: str, result: ChatResult) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text,
                                             "refusal": None},
                     "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": usage(result), "system_fingerprint": None,
    }


def chunk(cid: str, model: str, created: int, delta: dict[str, Any],
          finish: Literal["stop", "length"] | str | None = None,
          with_usage: bool = False) -> str:
    body: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage:
        body["usage"] = None
    return sse(body)


def usage_chunk(cid: str, model: str, created: int, result: ChatResult) -> str:
    return sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [], "usage": usage(result)})


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


class OpenAIChunks:
    """``chat.completion.chunk`` events, the usage chunk if asked, then ``[DONE]``."""

    media_type = "text/event-stream"

    def __init__(self, cid: str, model: str, include_usage: bool) -> None:
        self.cid, self.model, self.include_usage = cid, model, include_usage
        self.created = int(time.time())

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> str:
        return chunk(self.cid, self.model, self.created, delta, finish=finish,
                     with_usage=self.include_usage)

    def opening(self) -> list[str]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def delta(self, text: str) -> str:
        return self._chunk({"content": text})

    def closing(self, result: ChatResult) -> list[str]:
        lines = [self._chunk({}, finish=result.finish_reason)]
        if self.include_usage:
            lines.append(usage_chunk(self.cid, self.model, self.created, result))
        return lines

    def error(self, err: APIError) -> str:
        return sse(err.body())

    def ending(self) -> list[str]:
        return ["data: [DONE]\n\n"]
