"""Rendering ``APIError`` as a response in the shape of the API the path belongs to
(OpenAI's, or Google's for the Gemini routes), and the app's exception handlers."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server.errors import APIError, insufficient_storage, server_error
from server.store.storage import is_storage_full
from server.wire.gemini import gemini_body

log = logging.getLogger(__name__)

_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error",
                 429: "rate_limit_error"}


_STATUS_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed",
                 413: "request_too_large"}


_GEMINI_PATH = re.compile(r"^/v1beta/|^/v1/models/[^/]+:\w+$")


def is_gemini_path(path: str) -> bool:
    """The Gemini-compatible routes answer errors in Google's shape, not OpenAI's."""
    return bool(_GEMINI_PATH.match(path))


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
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):  # where it came, not its name
        loc = loc[1:]
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
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":  # no route has this path
            message = (f"No such endpoint: {request.method} {request.url.path[:200]}. This "
                       "server answers the OpenAI API under /v1 (e.g. /v1/images/generations) "
                       "and the Gemini API under /v1beta (e.g. /v1beta/models/...); check "
                       "your client's base URL.")
        err = APIError(exc.status_code, message,
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
