"""A fake Anthropic upstream: the Messages API (``POST /v1/messages``) on loopback, with
the failure modes of ``tests.fakes`` in Anthropic's error shape.

It answers in the API's own shape: text content blocks, a ``stop_reason``, ``usage`` in
input and output tokens; with ``"stream": true`` as the API's event stream, a word per
delta. The answer echoes the last user turn and counts the image blocks
it received, so a test sees what reached Claude: ``echo: <text> [images: N]``; the
system prompt, when one came, is echoed as ``(system: ...)``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.fakes import FakeUpstream, echo_of, run_app

IMAGE_TOKENS = 1600  # a picture at Claude's largest size costs about this many


class FakeAnthropic(FakeUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.app = self._build()

    def _defaults(self) -> None:
        super()._defaults()
        self.chunk_delay_s = 0.0  # between the deltas of a streamed answer
        self.fail_mid_stream = False  # an error event after the first delta

    def _error(self, status: int, kind: str, message: str,
               headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}},
                            status_code=status,
                            headers={"request-id": "req_fake_err", **(headers or {})})

    def _failure(self, mode: str, key: str) -> Response | None:
        said = echo_of(self, key)
        if mode == "rate_limit":
            return self._error(429, "rate_limit_error",
                               f"Number of requests has exceeded your rate limit{said}",
                               {"retry-after": str(self.retry_after)})
        if mode == "error500":
            return self._error(500, "api_error", f"Internal server error{said}")
        if mode == "error503":
            return self._error(529, "overloaded_error", f"Overloaded{said}")
        if mode == "auth":
            return self._error(401, "authentication_error", "invalid x-api-key" + said)
        if mode == "malformed":
            return Response(b'{"type": "message", "content": [ not json',
                            media_type="application/json")
        if mode == "redirect":
            return Response(status_code=307, headers={"location": self.redirect_to})
        return None

    async def _messages(self, request: Request) -> Response:
        try:
            body: Any = await request.json()
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        mode = self.record(request.url.path, headers, body, dict(request.query_params))
        # The API takes the key as x-api-key or as a bearer token (the SDK sends the latter)
        auth = headers.get("authorization", "")
        key = headers.get("x-api-key", "") or (auth.removeprefix("Bearer ").strip()
                                                if auth.startswith("Bearer ") else "")
        if not key:
            return self._error(401, "authentication_error", "x-api-key header is required")
        if self.expected_key is not None and key != self.expected_key:
            return self._error(401, "authentication_error", "invalid x-api-key")
        if "anthropic-version" not in headers:
            return self._error(400, "invalid_request_error",
                               "anthropic-version: header is required")
        if mode == "hang":
            await self.hang()
            mode = "ok"
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        failure = self._failure(mode, key)
        if failure is not None:
            return failure
        if not isinstance(body, dict) or not body.get("messages") \
                or not isinstance(body.get("max_tokens"), int):
            return self._error(400, "invalid_request_error",
                               "messages and max_tokens are required")
        if "temperature" in body and "top_p" in body:
            return self._error(400, "invalid_request_error",
                               "temperature and top_p cannot both be specified")
        if mode == "wrong_shape":
            return JSONResponse({"type": "message", "id": "msg_fake", "content": "text"})
        if body.get("stream"):
            return StreamingResponse(self._events(_answer(body)), media_type="text/event-stream",
                                     headers={"request-id": "req_fake_anthropic"})
        return JSONResponse(_answer(body), headers={"request-id": "req_fake_anthropic"})

    async def _events(self, answer: dict[str, Any]) -> AsyncIterator[bytes]:
        """The Messages API's event stream for an answer: a word per delta,
        ``chunk_delay_s`` apart; with ``fail_mid_stream`` an overloaded error after the
        first."""

        def event(kind: str, data: dict[str, Any]) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

        usage = answer["usage"]
        yield event("message_start", {"message": {
            **answer, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 1}}})
        yield event("content_block_start", {"index": 0,
                                            "content_block": {"type": "text", "text": ""}})
        words = answer["content"][0]["text"].split(" ")
        for i, word in enumerate(words):
            text = word if i == 0 else " " + word
            yield event("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                                      "text": text}})
            if self.fail_mid_stream:
                yield event("error", {"error": {"type": "overloaded_error",
                                                "message": "Overloaded"}})
                return
            await asyncio.sleep(self.chunk_delay_s)
        yield event("content_block_stop", {"index": 0})
        yield event("message_delta", {"delta": {"stop_reason": answer["stop_reason"],
                                                "stop_sequence": answer["stop_sequence"]},
                                      "usage": {"output_tokens": usage["output_tokens"]}})
        yield event("message_stop", {})

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/messages")
        async def messages(request: Request) -> Response:
            return await self._messages(request)

        return app


def _answer(body: dict[str, Any]) -> dict[str, Any]:
    words = 0
    images = 0
    last_user = ""
    for turn in body["messages"]:
        content = turn.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        texts = [str(b.get("text", "")) for b in blocks or [] if b.get("type") == "text"]
        images += sum(1 for b in blocks or [] if b.get("type") == "image")
        words += sum(len(t.split()) for t in texts)
        if turn.get("role") == "user":
            last_user = " ".join(texts)
    system = body.get("system")
    reply = f"echo: {last_user} [images: {images}]".split()
    if system:
        reply.append(f"(system: {system})")
    stop, stop_sequence = "end_turn", None
    for word in list(reply):
        if word in (body.get("stop_sequences") or []):
            reply, stop, stop_sequence = reply[:reply.index(word)], "stop_sequence", word
            break
    if len(reply) > body["max_tokens"]:
        reply, stop = reply[:body["max_tokens"]], "max_tokens"
    prompt = words + IMAGE_TOKENS * images + (len(str(system).split()) if system else 0)
    return {"id": "msg_fake", "type": "message", "role": "assistant",
            "model": str(body.get("model", "")),
            "content": [{"type": "text", "text": " ".join(reply)}],
            "stop_reason": stop, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": prompt, "output_tokens": len(reply)}}


def image_blocks(body: Any) -> list[dict[str, Any]]:
    """Every image block in a recorded Messages body, in order."""
    found: list[dict[str, Any]] = []
    for turn in (body or {}).get("messages", []):
        content = turn.get("content")
        if isinstance(content, list):
            found.extend(b for b in content if b.get("type") == "image")
    return found


@contextmanager
def running_fake_anthropic() -> Iterator[FakeAnthropic]:
    fake = FakeAnthropic()
    with run_app(fake.app, fake) as url:
        fake.url = url
        yield fake
