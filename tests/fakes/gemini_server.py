"""A fake Gemini Developer API: ``POST /{v1beta|v1}/models/{model}:generateContent``, on
loopback, with failure modes (see ``tests.fakes``)."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.fakes import FakeUpstream, color_for, echo_of, png_b64, run_app

VERSIONS = ("v1", "v1beta")

# gemini-2.5-flash-image output sizes by aspect ratio
ASPECT_SIZES = {"1:1": (1024, 1024), "2:3": (832, 1248), "3:2": (1248, 832),
                "3:4": (864, 1184), "4:3": (1184, 864), "4:5": (896, 1152),
                "5:4": (1152, 896), "9:16": (768, 1344), "16:9": (1344, 768),
                "21:9": (1536, 672)}


def _get(d: dict[str, Any], camel: str, snake: str) -> Any:
    return d.get(camel, d.get(snake))


def decode_b64_any(data: str) -> bytes:
    """Standard or URL-safe base64, padded or not (the SDK sends URL-safe)."""
    padded = data + "=" * (-len(data) % 4)
    try:
        return base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_"))
    except (binascii.Error, ValueError):
        return b""


def inline_images(body: Any) -> list[tuple[str, bytes]]:
    """(mime type, bytes) of every inline-data part in a recorded request body, in order;
    camelCase and snake_case both."""
    out: list[tuple[str, bytes]] = []
    for content in (body or {}).get("contents", []) or []:
        for part in content.get("parts", []) or []:
            blob = _get(part, "inlineData", "inline_data")
            if isinstance(blob, dict):
                out.append((str(_get(blob, "mimeType", "mime_type")),
                            decode_b64_any(str(blob.get("data", "")))))
    return out


def _text_of(content: dict[str, Any]) -> str:
    return " ".join(str(p["text"]) for p in content.get("parts", []) or [] if "text" in p)


class FakeGemini(FakeUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.app = self._build()

    def _error(self, code: int, status: str, message: str,
               details: list[dict[str, Any]] | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
        error: dict[str, Any] = {"code": code, "message": message, "status": status}
        if details:
            error["details"] = details
        return JSONResponse({"error": error}, status_code=code, headers=headers)

    def _failure(self, mode: str, key: str) -> Response | None:
        said = echo_of(self, key)
        if mode == "rate_limit":
            return self._error(
                429, "RESOURCE_EXHAUSTED", f"Resource has been exhausted{said}",
                [{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                  "violations": [{"quotaMetric": "generate_content_free_tier_requests"}]},
                 {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                  "retryDelay": f"{self.retry_after}s"}],
                {"retry-after": str(self.retry_after)})
        if mode == "error500":
            return self._error(500, "INTERNAL", f"An internal error has occurred{said}")
        if mode == "error503":
            return self._error(503, "UNAVAILABLE", f"The model is overloaded{said}")
        if mode == "auth":
            return self._error(403, "PERMISSION_DENIED", "Permission denied" + (said or "."))
        if mode == "malformed":
            return Response(b'{"candidates": [ this is not json', media_type="application/json")
        if mode == "redirect":
            return Response(status_code=307, headers={"location": self.redirect_to})
        return None

    async def _handle(self, version: str, model_action: str, request: Request) -> Response:
        try:
            body: Any = await request.json()
        except ValueError:
            body = None
        mode = self.record(request.url.path, {k.lower(): v for k, v in request.headers.items()},
                           body, dict(request.query_params))
        model, _, action = model_action.partition(":")
        if version not in VERSIONS or action != "generateContent" or not model:
            return self._error(404, "NOT_FOUND", f"{request.url.path} is not found")
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key", "")
        if not key:
            return self._error(403, "PERMISSION_DENIED",
                               "Method doesn't allow unregistered callers.")
        if self.expected_key is not None and key != self.expected_key:
            return self._error(
                400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                  "reason": "API_KEY_INVALID"}])
        if mode == "hang":
            await self.hang()
            mode = "ok"
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        failure = self._failure(mode, key)
        if failure is not None:
            return failure
        if not isinstance(body, dict) or not body.get("contents"):
            return self._error(400, "INVALID_ARGUMENT", "contents is not specified")
        return JSONResponse(_answer(body, model, mode == "wrong_shape", len(self.calls)))

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/{version}/models/{model_action}")
        async def generate(version: str, model_action: str, request: Request) -> Response:
            return await self._handle(version, model_action, request)

        return app


def _answer(body: dict[str, Any], model: str, wrong_shape: bool, n: int) -> dict[str, Any]:
    config = _get(body, "generationConfig", "generation_config") or {}
    modalities = [str(m).upper()
                  for m in _get(config, "responseModalities", "response_modalities") or []]
    contents = body.get("contents") or []
    prompt_words = sum(len(_text_of(c).split()) for c in contents)
    system = _get(body, "systemInstruction", "system_instruction")
    if isinstance(system, dict):
        prompt_words += len(_text_of(system).split())
    images_in = len(inline_images(body))
    prompt_tokens = prompt_words + 258 * images_in
    finish = "STOP"
    if "IMAGE" in modalities:
        if wrong_shape:
            parts: list[dict[str, Any]] = [{"text": "I would rather not draw today."}]
        else:
            image_config = _get(config, "imageConfig", "image_config") or {}
            ratio = _get(image_config, "aspectRatio", "aspect_ratio") or "1:1"
            w, h = ASPECT_SIZES.get(str(ratio), (1024, 1024))
            parts = [{"text": "Here is your picture."},
                     {"inlineData": {"mimeType": "image/png", "data": png_b64(w, h, color_for(n))}}]
        out_tokens = 1290
    else:
        if wrong_shape:
            return {"candidates": [], "modelVersion": model}
        users = [c for c in contents if c.get("role", "user") == "user"]
        last = _text_of(users[-1]) if users else ""
        reply = f"echo: {last} [images: {images_in}]".split()
        limit = _get(config, "maxOutputTokens", "max_output_tokens")
        if isinstance(limit, int) and len(reply) > limit:
            reply, finish = reply[:limit], "MAX_TOKENS"
        parts = [{"text": " ".join(reply)}]
        out_tokens = len(reply)
    return {
        "candidates": [{"content": {"role": "model", "parts": parts},
                        "finishReason": finish, "index": 0}],
        "usageMetadata": {"promptTokenCount": prompt_tokens,
                          "candidatesTokenCount": out_tokens,
                          "totalTokenCount": prompt_tokens + out_tokens},
        "modelVersion": model,
        "responseId": f"resp_fake_{n}",
    }


@contextmanager
def running_fake_gemini() -> Iterator[FakeGemini]:
    fake = FakeGemini()
    with run_app(fake.app, fake) as url:
        fake.url = url
        yield fake
