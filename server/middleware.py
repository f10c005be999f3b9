"""Pure ASGI middleware: request ids, the body size cap (no buffering of responses), and
at the end of every response its metrics and its access-log line."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import access_log
from server.errors import APIError, error_response

log = logging.getLogger(__name__)
UNMATCHED = "unmatched"


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.",
                    code="request_too_large")


def _template_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p)
                              for p in parts) + "$")


def endpoint_of(scope: Scope) -> str:
    """The matched route's template ("/v1/images/{image_id}"): a label of bounded
    cardinality. A request refused before routing (a 413 on Content-Length) is matched
    against the app's documented paths; a path no route knows is ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    app = scope.get("app")
    openapi = getattr(app, "openapi", None)
    if openapi is None:
        return UNMATCHED
    try:
        templates = list(openapi().get("paths", {}))
    except Exception:  # a schema that cannot be built must not break a response
        return UNMATCHED
    wanted = scope.get("path", "")
    for template in sorted(templates, key=lambda t: str(t).count("{")):  # literals first
        if _template_pattern(str(template)).match(wanted):
            return str(template)
    return UNMATCHED


# What a client may choose as its request id: enough for UUIDs, ULIDs, trace ids and our
# own "req_<hex>", and nothing a log format could read as structure (spaces, '=', quotes,
# control characters, newlines).
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+-]{1,128}")


def request_id_of(given: bytes | None) -> str:
    """The client's ``x-request-id`` when it is a safe token, else a fresh one: the id goes
    into every access-log line (text ``key=value`` and JSON), the ledger and the reply."""
    if given is not None and _CLIENT_REQUEST_ID.fullmatch(given):
        return given.decode("ascii")
    return f"req_{uuid.uuid4().hex}"


class RequestContext:
    """Echo or mint ``x-request-id``; refuse bodies over ``max_body`` bytes with a 413;
    count the request and log it when its response ends."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = request_id_of(headers.get(b"x-request-id"))
        scope.setdefault("state", {})["request_id"] = request_id
        end = _End(scope, request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                end.status = message["status"]
                message.setdefault("headers", [])
                for name, value in message["headers"]:
                    if name.lower() == b"x-spillway-route":
                        end.route_header = value.decode("latin-1")
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode("latin-1"))]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Before the last byte leaves: no client sees a response before its metrics.
                end.finish()
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                await error_response(_too_large(self.max_body), scope.get("path", ""))(
                    scope, receive, send_with_id)
                return

            seen = 0

            async def counted_receive() -> Message:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.disconnect":
                    end.disconnected = True
                elif message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        # FastAPI re-raises HTTPException from body parsing; anything else
                        # would become a 400. The error handler gives it the OpenAI shape.
                        raise HTTPException(413, _too_large(self.max_body).message)
                return message

            await self.app(scope, counted_receive, send_with_id)
        except BaseException:
            if end.status is None:
                end.status = 500  # what the outer error handler answers
            raise
        finally:
            end.finish()


class _End:
    """The end of one response, observed once: when its last body chunk goes out, or
    when the app returns without sending one (client gone: 499; crashed: 500)."""

    def __init__(self, scope: Scope, request_id: str) -> None:
        self.scope = scope
        self.request_id = request_id
        self.started = time.monotonic()
        self.status: int | None = None
        self.disconnected = False
        self.done = False
        # A stream cut short has no ``Served`` yet; its headers said where it ran.
        self.route_header: str | None = None

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self._observe()
        except Exception:  # accounting of the request must never break the request
            log.exception("could not observe request %s", self.request_id)

    def _observe(self) -> None:
        scope = self.scope
        latency = time.monotonic() - self.started
        status = self.status or 500
        if self.disconnected and status < 400:
            status = 499  # the client left before the last byte (nginx's convention)
        state: dict[str, Any] = scope.get("state") or {}
        account = state.get("account")
        served = account.served if account is not None else None
        route = served.route if served else (self.route_header or "none")
        endpoint = endpoint_of(scope)
        # Refused before the route knew its model (a malformed body): the Gemini paths
        # still name it in the URL.
        model = account.model if account is not None else (
            scope.get("path_params") or {}).get("model")
        app_state = getattr(getattr(scope.get("app"), "state", None), "spillway", None)
        if app_state is not None:
            app_state.metrics.observe_request(
                endpoint, scope.get("method", ""), model, route, status, latency)
        if access_log.log.isEnabledFor(logging.INFO):
            caller = state.get("caller")
            access_log.emit(access_log.access_fields(
                ts=time.time(), request_id=self.request_id,
                key_name=caller.name if caller is not None else None,
                method=scope.get("method", ""), endpoint=endpoint,
                path=scope.get("path", ""), status=status, latency_s=latency,
                account=account, route=route, model=model))
