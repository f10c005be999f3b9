"""One error type, one body shape: ``{"error": {"message", "type", "param", "code"}}``.

No HTTP here: the rendering (OpenAI's shape or Google's) is server/http/errors.py."""

from __future__ import annotations

import math
from typing import Any

from server.retry_after import retry_headers


class APIError(Exception):
    """Raised anywhere in the server; becomes an OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None,
                code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model {model!r} does not exist on this server.",
                    param="model", code="model_not_found")


def queue_full(retry_after_s: float) -> APIError:
    """``retry_after_s`` is the drain estimate; the headers say no more than clients
    honour (server/retry_after.py), the message says the estimate when it is longer."""
    headers = retry_headers(retry_after_s)
    wait = headers["Retry-After"]
    drain = round(retry_after_s) if math.isfinite(retry_after_s) else 0
    ahead = f" (about {drain} s of work ahead)" if drain > int(wait) else ""
    return APIError(429, f"The local queue is full{ahead}; retry in about {wait} s.",
                    type="rate_limit_error", code="queue_full", headers=headers)


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down.", type="server_error",
                    code="shutting_down")


def insufficient_storage() -> APIError:
    return APIError(507, "The server's storage is full, so this request could not be "
                    "stored; nothing of it was kept. Retry once the operator has freed "
                    "space.", type="server_error", code="insufficient_storage",
                    # The openai SDK would otherwise retry a 5xx at once, twice, into the
                    # same full disk: the client hears it now and decides.
                    headers={"x-should-retry": "false"})


def server_error(message: str = "The server failed to process this request.") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def context_error(prompt_tokens: int, max_tokens: int, context: int) -> APIError:
    return APIError(400, f"This model's maximum context length is {context} tokens. However, "
                    f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                    f"messages, {max_tokens} in the completion).", param="messages",
                    code="context_length_exceeded")
