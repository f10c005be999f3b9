"""A fake OpenAI (and Azure OpenAI) upstream: images/generations, images/edits and
chat/completions, on loopback, with failure modes (see ``tests.fakes``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from tests.fakes import FakeUpstream, color_for, echo_of, png_b64, run_app

# gpt-image-1's output tokens per image, by quality and size (OpenAI's published counts),
# for the usage block; a prompt is PROMPT_TOKENS text tokens.
IMAGE_TOKENS = {
    "low": {"1024x1024": 272, "1536x1024": 408, "1024x1536": 400},
    "medium": {"1024x1024": 1056, "1536x1024": 1584, "1024x1536": 1568},
    "high": {"1024x1024": 4160, "1536x1024": 6240, "1024x1536": 6208},
}
PROMPT_TOKENS = 50


class FakeOpenAI(FakeUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.app = self._build()

    def _defaults(self) -> None:
        super()._defaults()
        # gpt-image models report their token usage; on, the answers carry it (and the
        # ledger then bills by it), off they carry none (billed by the price table).
        self.report_usage = False

    @property
    def base_url(self) -> str:
        """What an OpenAI client's base_url should be (``url`` is the root, for Azure)."""
        return f"{self.url}/v1"

    # -- the wire

    def _error(self, status: int, message: str, type_: str, code: str | None,
               headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": type_, "param": None,
                                       "code": code}},
                            status_code=status, headers=headers)

    def _rid(self, key: str) -> dict[str, str]:
        # A hostile relay may hand the key back as a request id, which the SDK logs.
        if self.echo_variants and key:
            return {"x-request-id": f"req_{key}"}
        return {"x-request-id": f"req_fake_{len(self.calls)}"}

    def _failure(self, mode: str, key: str) -> Response | None:
        """The answer for a failing mode, or None to go on."""
        said = echo_of(self, key)
        rid = self._rid(key)
        if mode == "rate_limit":
            return self._error(429, f"Rate limit reached for requests{said}", "requests",
                               "rate_limit_exceeded",
                               {**rid, "retry-after": str(self.retry_after)})
        if mode in ("error500", "error503"):
            status = 500 if mode == "error500" else 503
            return self._error(status, f"The server had an error{said}", "server_error", None,
                               rid)
        if mode == "auth":
            return self._error(401, "Incorrect API key provided" + (said or "."),
                               "invalid_request_error", "invalid_api_key", rid)
        if mode == "malformed":
            return Response(b'{"created": 1, "data": [ this is not json',
                            media_type="application/json", headers=rid)
        if mode == "redirect":
            return Response(status_code=307, headers={**rid, "location": self.redirect_to})
        return None

    def _key(self, request: Request, azure: bool) -> tuple[str, Response | None]:
        """The key the request carries, and a 401 when it carries the wrong one."""
        if azure:
            key = request.headers.get("api-key", "")
            if not key:
                return key, self._error(401, "Access denied due to missing api-key.",
                                        "invalid_request_error", "401")
            if "api-version" not in request.query_params:
                return key, self._error(404, "Resource not found", "invalid_request_error",
                                        "404")
        else:
            auth = request.headers.get("authorization", "")
            key = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
            if not key:
                return key, self._error(401, "You didn't provide an API key.",
                                        "invalid_request_error", None)
        if self.expected_key is not None and key != self.expected_key:
            return key, self._error(401, "Incorrect API key provided.",
                                    "invalid_request_error", "invalid_api_key")
        return key, None

    async def _handle(self, request: Request, kind: str, azure: bool) -> Response:
        body: Any
        if kind == "edits":
            body = await _parse_multipart(request)
        else:
            try:
                body = await request.json()
            except ValueError:
                body = None
        mode = self.record(request.url.path, {k.lower(): v for k, v in request.headers.items()},
                           body, dict(request.query_params))
        key, refusal = self._key(request, azure)
        if refusal is not None:
            return refusal
        if mode == "hang":
            await self.hang()
            mode = "ok"
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        failure = self._failure(mode, key)
        if failure is not None:
            return failure
        if not isinstance(body, dict):
            return self._error(400, "We could not parse the JSON body of your request.",
                               "invalid_request_error", None)
        rid = self._rid(key)
        if kind == "chat":
            if mode == "wrong_shape":
                return JSONResponse({"id": "chatcmpl-fake", "object": "chat.completion",
                                     "choices": []}, headers=rid)
            return JSONResponse(_chat_answer(body), headers=rid)
        if mode == "wrong_shape":
            return JSONResponse({"created": int(time.time()),
                                 "data": [{"b64_json": "%%% not base64 %%%"}]}, headers=rid)
        return JSONResponse(_images_answer(body, self.report_usage), headers=rid)

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/images/generations")
        async def generations(request: Request) -> Response:
            return await self._handle(request, "generations", azure=False)

        @app.post("/v1/images/edits")
        async def edits(request: Request) -> Response:
            return await self._handle(request, "edits", azure=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._handle(request, "chat", azure=False)

        @app.post("/openai/deployments/{deployment}/images/generations")
        async def azure_generations(deployment: str, request: Request) -> Response:
            return await self._handle(request, "generations", azure=True)

        @app.post("/openai/deployments/{deployment}/images/edits")
        async def azure_edits(deployment: str, request: Request) -> Response:
            return await self._handle(request, "edits", azure=True)

        @app.post("/openai/deployments/{deployment}/chat/completions")
        async def azure_chat(deployment: str, request: Request) -> Response:
            return await self._handle(request, "chat", azure=True)

        return app


async def _parse_multipart(request: Request) -> dict[str, Any]:
    """{field: value}, a repeated field as a list; files as
    {"filename", "content_type", "data"}."""
    form = await request.form()
    out: dict[str, Any] = {}
    for name, value in form.multi_items():
        item: Any
        if isinstance(value, UploadFile):
            item = {"filename": value.filename, "content_type": value.content_type,
                    "data": await value.read()}
        else:
            item = value
        if name in out:
            prev = out[name]
            out[name] = [*prev, item] if isinstance(prev, list) else [prev, item]
        else:
            out[name] = item
    return out


def _size(body: dict[str, Any]) -> tuple[str, int, int]:
    size = str(body.get("size") or "auto")
    if size == "auto":
        size = "1024x1024"
    try:
        w, h = (int(v) for v in size.split("x"))
    except ValueError:
        return "1024x1024", 1024, 1024
    return size, w, h


def _images_answer(body: dict[str, Any], usage: bool) -> dict[str, Any]:
    size, w, h = _size(body)
    n = int(body.get("n") or 1)
    quality = body.get("quality") if body.get("quality") in IMAGE_TOKENS else "medium"
    per_image = IMAGE_TOKENS[str(quality)].get(size, 1056)
    answer = {
        "created": int(time.time()),
        "data": [{"b64_json": png_b64(w, h, color_for(i))} for i in range(n)],
        "output_format": body.get("output_format") or "png",
        "quality": body.get("quality") or "medium",
        "size": size,
        "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": per_image * n,
                  "total_tokens": PROMPT_TOKENS + per_image * n,
                  "input_tokens_details": {"text_tokens": PROMPT_TOKENS, "image_tokens": 0}},
    }
    if not usage:
        del answer["usage"]
    return answer


def _words(content: Any) -> tuple[str, int]:
    """The text of a message's content and how many image parts it has."""
    if isinstance(content, str):
        return content, 0
    texts: list[str] = []
    images = 0
    for part in content or []:
        if part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        elif part.get("type") == "image_url":
            images += 1
    return " ".join(texts), images


def _chat_answer(body: dict[str, Any]) -> dict[str, Any]:
    messages = body.get("messages") or []
    prompt_words = 0
    total_images = 0
    last_user = ""
    for message in messages:
        text, images = _words(message.get("content"))
        prompt_words += len(text.split())
        total_images += images
        if message.get("role") == "user":
            last_user = text
    reply = f"echo: {last_user} [images: {total_images}]".split()
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    finish = "stop"
    if isinstance(limit, int) and len(reply) > limit:
        reply, finish = reply[:limit], "length"
    prompt_tokens = prompt_words + 85 * total_images + 3 * len(messages)
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model", "")),
        "choices": [{"index": 0, "finish_reason": finish,
                     "message": {"role": "assistant", "content": " ".join(reply)}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(reply),
                  "total_tokens": prompt_tokens + len(reply)},
    }


def image_url_parts(body: Any) -> list[str]:
    """Every image_url URL in a recorded chat body, in order."""
    urls: list[str] = []
    for message in (body or {}).get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            urls.extend(p["image_url"]["url"] for p in content if p.get("type") == "image_url")
    return urls


@contextmanager
def running_fake_openai() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    with run_app(fake.app, fake) as url:
        fake.url = url
        yield fake
