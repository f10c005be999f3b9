"""What a connection may hold before its request reaches the app: the request head.

Measured with uvicorn 0.54 and its default HTTP parser, httptools 0.9 (llhttp): there is no
bound on the head. A 64 MiB header was read to the end and answered 200 (65 MB more
memory and 5 s of CPU for one connection), and a head sent slowly is held forever: the
keep-alive timer stops at the first byte. uvicorn's ``h11_max_incomplete_event_size``
bounds only the h11 parser, which is pure Python and several times slower per request;
so the server keeps httptools and this protocol counts the bytes of an unfinished head
itself (``max_header_kb``: 431) and gives it ``header_timeout_s`` to arrive (408), both
answered in the OpenAI error shape and followed by closing the connection. Bytes are
counted per read, so a head may run over the limit by one read (at most 256 KiB) before
it is refused; what a slow *body* may hold is RequestContext's (server/http/middleware.py).
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from typing import Any

from server.config import Settings
from server.errors import APIError

log = logging.getLogger(__name__)


def uvicorn_limits(settings: Settings) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for the limits in ``settings``."""
    try:
        import httptools  # noqa: F401  (uvicorn's fast parser; optional in uvicorn)
    except ImportError:  # h11 bounds the head itself; it has no head timeout
        return {"http": "h11", "h11_max_incomplete_event_size": settings.max_header_kb * 1024}
    return {"http": bounded_httptools(settings.max_header_kb * 1024,
                                      settings.header_timeout_s)}


def refusal(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response, written before (or instead of) the app: the error in
    the OpenAI shape, then the connection is closed."""
    body = json.dumps(APIError(status, message, code=code).body()).encode()
    phrase = http.HTTPStatus(status).phrase
    return (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def bounded_httptools(max_head_bytes: int, head_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a bound on the size and the time of each request
    head. A class per server, as uvicorn takes a class and builds one per connection."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpTools(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True  # between requests too: the next byte starts a head
            self._head_bytes = 0
            self._head_timer: asyncio.TimerHandle | None = None

        def data_received(self, data: bytes) -> None:
            counting = self._in_head
            if counting:
                # Every byte of a read that starts inside a head and ends inside it is
                # head: no body or other request can be in between.
                self._head_bytes += len(data)
                if self._head_timer is None:
                    self._head_timer = self.loop.call_later(head_timeout_s, self._too_slow)
            super().data_received(data)
            if counting and self._in_head and self._head_bytes > max_head_bytes:
                self._refuse(431, f"The request headers are larger than {max_head_bytes} "
                             "bytes.", "request_header_too_large")

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_bytes = 0
            self._stop_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def _too_slow(self) -> None:
            self._head_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                # A pipelined head behind a response still running: judge it once the
                # response is out, not in the middle of it.
                self._head_timer = self.loop.call_later(head_timeout_s, self._too_slow)
                return
            self._refuse(408, f"The request headers took longer than {head_timeout_s:g} s "
                         "to arrive.", "request_timeout")

        def _stop_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _refuse(self, status: int, message: str, code: str) -> None:
            if self.transport.is_closing():
                return
            log.info("refused a request head from %s: %s", self.client, message)
            # A head pipelined behind a response still being sent: no room for an answer.
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(refusal(status, message, code))
            self.transport.close()

    return BoundedHttpTools
