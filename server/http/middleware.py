"""Pure ASGI middleware: request ids, the body size cap (no buffering of responses), and
at the end of every response its metrics and its access-log line."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError
from server.http.errors import error_response
from server.ops import access_log

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


@dataclass(frozen=True)
class BodyPace:
    """How slowly a request body may arrive (Settings.body_timeout_s and
    body_min_bytes_per_s): a client that sends slower holds a connection and its buffers
    for nothing."""

    timeout_s: float
    min_bytes_per_s: float

    @staticmethod
    def of(scope: Scope) -> BodyPace | None:
        """The app's settings, read per request (the middleware is built before them)."""
        app_state = getattr(getattr(scope.get("app"), "state", None), "spillway", None)
        settings = getattr(app_state, "settings", None)
        if settings is None:
            return None
        return BodyPace(settings.body_timeout_s, settings.body_min_bytes_per_s)

    def deadline(self, started: float, last: float, received: int) -> float:
        """When the next part of the body must have come: ``timeout_s`` after the last
        one, and on average ``min_bytes_per_s`` once the first ``timeout_s`` are over, so
        a trickle of a byte every few seconds, which never stalls, is refused too."""
        return min(last + self.timeout_s,
                   started + self.timeout_s + received / self.min_bytes_per_s)


def _has_body(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


def _too_slow(pace: BodyPace) -> APIError:
    return APIError(408, f"The request body arrived too slowly (a pause over "
                    f"{pace.timeout_s:g} s, or under {pace.min_bytes_per_s:g} bytes/s).",
                    code="request_timeout")


class RequestContext:
    """Echo or mint ``x-request-id``; refuse bodies over ``max_body`` bytes with a 413
    and bodies that arrive too slowly (``BodyPace``) with a 408; count the request and
    log it when its response ends."""

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
        scope["state"]["arrived"] = end.started  # the client's deadline counts from here
        pace = BodyPace.of(scope)
        body_left = _has_body(headers)  # a body is coming and not all of it is here
        seen, last = 0, end.started
        timed_out = False  # our 408 went out: what the app answers after it is dropped

        async def send_with_id(message: Message) -> None:
            if timed_out:
                return
            if message["type"] == "http.response.start":
                end.status = message["status"]
                message.setdefault("headers", [])
                for name, value in message["headers"]:
                    if name.lower() == b"x-spillway-route":
                        end.route_header = value.decode("latin-1")
                extra = [(b"x-request-id", request_id.encode("latin-1"))]
                if body_left and all(n.lower() != b"connection" for n, _ in message["headers"]):
                    # Answered before the body was read to its end (a 401, a 413): close,
                    # or the client could keep the connection by never finishing it.
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message["headers"], *extra]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Before the last byte leaves: no client sees a response before its metrics.
                end.finish()
            await send(message)

        async def paced_receive() -> Message:
            nonlocal timed_out
            if not body_left or pace is None or timed_out:
                return await receive()  # after the body: waiting for a disconnect is fine
            wait = pace.deadline(end.started, last, seen) - time.monotonic()
            try:
                # A timeout scope, not wait_for: that would run receive() as a task of its
                # own, one trip round the event loop even when the body is already here,
                # and under a burst each trip waits behind every other request's turn.
                async with asyncio.timeout(max(0.0, wait)):
                    return await receive()
            except TimeoutError:
                log.info("request %s: %s", request_id, _too_slow(pace).message)
                if end.status is None:
                    response = error_response(_too_slow(pace), scope.get("path", ""))
                    response.headers["connection"] = "close"
                    await response(scope, receive, send_with_id)
                    timed_out = True
                # To the app the client is gone: it stops reading and answers no one.
                return {"type": "http.disconnect"}

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                await error_response(_too_large(self.max_body), scope.get("path", ""))(
                    scope, receive, send_with_id)
                return

            async def counted_receive() -> Message:
                nonlocal seen, last, body_left
                message = await paced_receive()
                if message["type"] == "http.disconnect":
                    end.disconnected = end.disconnected or not timed_out
                elif message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    last = time.monotonic()
                    body_left = body_left and bool(message.get("more_body"))
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
