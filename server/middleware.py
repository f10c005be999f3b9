"""Pure ASGI middleware: request ids and the body size cap (no buffering of responses)."""

from __future__ import annotations

import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_response


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.",
                    code="request_too_large")


class RequestContext:
    """Echo or mint ``x-request-id``; refuse bodies over ``max_body`` bytes with a 413."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")[:128]
        request_id = given or f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await error_response(_too_large(self.max_body))(scope, receive, send_with_id)
            return

        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    # FastAPI re-raises HTTPException from body parsing; anything else
                    # would become a 400. The error handler gives it the OpenAI shape.
                    raise HTTPException(413, _too_large(self.max_body).message)
            return message

        await self.app(scope, counted_receive, send_with_id)
