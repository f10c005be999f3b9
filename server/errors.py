"""One error type, one body shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


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
    seconds = max(1, round(retry_after_s))
    return APIError(429, f"The local queue is full; retry in about {seconds} s.",
                    type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(seconds)})


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down.", type="server_error",
                    code="shutting_down")


def from_batch_failure(exc: BaseException, timeout_s: float, what: str) -> APIError:
    """What a request sees when its item failed in the batcher or on the device."""
    from server.batcher import Closed, Expired

    if isinstance(exc, Expired):
        return APIError(503, f"The request waited longer than {timeout_s:g} s in the local "
                        "queue.", type="server_error", code="queue_timeout",
                        headers={"Retry-After": "1"})
    if isinstance(exc, Closed):
        return shutting_down()
    detail = str(exc).splitlines()[0][:200] if str(exc) else ""
    return APIError(500, f"The local {what} failed: {type(exc).__name__}"
                    + (f": {detail}" if detail else ""), type="server_error",
                    code="pipeline_error")


def server_error(message: str = "The server failed to process this request.") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error",
                 429: "rate_limit_error"}


_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    msg = str(first.get("msg", "Invalid request."))
    return (f"Invalid value for {param!r}: {msg}." if param else f"{msg}."), param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail),
                       type=_STATUS_TYPES.get(exc.status_code, "invalid_request_error"),
                       code=_STATUS_CODES.get(exc.status_code))
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(server_error())
