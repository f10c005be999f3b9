"""One error type, one body shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server.retry_after import retry_headers
from server.store.storage import is_storage_full

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


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error",
                 429: "rate_limit_error"}


_STATUS_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed",
                 413: "request_too_large"}


_GEMINI_PATH = re.compile(r"^/v1beta/|^/v1/models/[^/]+:\w+$")
_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT",
                  429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                  501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
                  507: "UNAVAILABLE"}


def is_gemini_path(path: str) -> bool:
    """The Gemini-compatible routes answer errors in Google's shape, not OpenAI's."""
    return bool(_GEMINI_PATH.match(path))


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


def google_client(headers: Mapping[str, str]) -> bool:
    """The google-genai SDK says who it is; paths it shares with the OpenAI API
    (``/v1/models``) answer it in Google's shape."""
    return "x-goog-api-client" in headers


def error_response(err: APIError, path: str = "",
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The error in the shape of the API the path (or the client) belongs to: OpenAI's
    unless Gemini's."""
    google = is_gemini_path(path) or (headers is not None and google_client(headers))
    body = gemini_body(err) if google else err.body()
    return JSONResponse(body, status_code=err.status, headers=err.headers)


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
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request.url.path, request.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param, code="invalid_value"),
                              request.url.path, request.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI's body reader says 400
            return Response(status_code=499)
        err = APIError(exc.status_code, str(exc.detail),
                       type=_STATUS_TYPES.get(exc.status_code, "invalid_request_error"),
                       code=_STATUS_CODES.get(exc.status_code))
        return error_response(err, request.url.path, request.headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client left while its body was being read: no one to answer, nothing went
        # wrong here. 499 (nginx's "client closed request") in the log and metrics.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if is_storage_full(exc):  # wherever a write found the disk full: the same 507
            log.error("storage full on %s %s: %s", request.method, request.url.path, exc)
            return error_response(insufficient_storage(), request.url.path, request.headers)
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(server_error(), request.url.path, request.headers)
