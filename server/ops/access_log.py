"""The access log: one line per request on the ``spillway.access`` logger.

The middleware builds the fields (``access_fields``, pure) when the response ends; the
message is the JSON object itself, so any handler prints a parseable line. ``spillway
serve`` gives the logger its own handler (``configure``): JSON lines on stdout by
default, ``key=value`` text or nothing as the ``access_log`` setting says.
The key's name is logged, never the key.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from server.job import Served


class Accounted(Protocol):
    """What the line reads of a request's account (server/serving/accounting.py ``Account``):
    an observer names only what it reads, and imports nothing above it."""

    @property
    def served(self) -> Served | None: ...

    @property
    def outcome(self) -> str: ...

    @property
    def images(self) -> int: ...

LOGGER = "spillway.access"
log = logging.getLogger(LOGGER)

# Routes whose path parameter is itself a credential (a `url` image id): the path is
# logged as its template.
SECRET_PATHS = frozenset({"/v1/images/{image_id}"})


def access_fields(*, ts: float, request_id: str, key_name: str | None, method: str,
                  endpoint: str, path: str, status: int, latency_s: float,
                  account: Accounted | None, route: str, model: str | None
                  ) -> dict[str, Any]:
    """The line's fields; what the route knew comes from its account."""
    served = account.served if account is not None else None
    ok = account is not None and account.outcome == "ok"
    latency_ms = latency_s * 1000
    queue_ms = served.queue_ms if served else 0.0
    return {
        "ts": datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
              .replace("+00:00", "Z"),
        "request_id": request_id,
        "key_name": key_name,
        "method": method,
        "endpoint": endpoint,
        "path": endpoint if endpoint in SECRET_PATHS else path,
        "model": model,
        "route": route,
        "reason": served.reason if served else None,
        "status": status,
        "queue_ms": round(queue_ms, 1),
        "run_ms": round(max(0.0, latency_ms - queue_ms), 1),
        "latency_ms": round(latency_ms, 1),
        "cost_usd": round(served.cost_usd, 6) if served and ok else 0.0,
        "images": account.images if account is not None and ok else 0,
        "prompt_tokens": served.prompt_tokens if served else 0,
        "completion_tokens": served.completion_tokens if served else 0,
    }


def emit(fields: dict[str, Any]) -> None:
    log.info(json.dumps(fields, separators=(",", ":")), extra={"access": fields})


class TextFormatter(logging.Formatter):
    """``access_log=text``: the same fields as ``key=value`` pairs, for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "access", None) is None:
            return super().format(record)
        # The fields as the message has them, not as ``record.access`` does: a filter on
        # the handler (server/redact.py takes secrets out) rewrites only the message.
        try:
            fields = json.loads(record.getMessage())
        except ValueError:
            return super().format(record)
        if not isinstance(fields, dict):
            return super().format(record)
        return " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items() if v is not None)


_BARE = re.compile(r"[A-Za-z0-9._:/@+\-]+")


def _logfmt(value: Any) -> str:
    """A value as logfmt writes it: bare when it is a plain token, else double-quoted
    with escapes, so a path or model name holding ``" key_name=admin"`` (from the URL,
    the client's to choose) can never read as a field of its own."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


def configure(mode: str, stream: IO[str] | None = None) -> None:
    """``json``: the bare JSON object per line; ``text``: key=value; ``off``: nothing.
    The access logger does not propagate, so the root handler never repeats a line."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.propagate = False
    log.disabled = mode == "off"
    log.setLevel(logging.INFO)
    if mode == "off":
        return
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(TextFormatter() if mode == "text"
                         else logging.Formatter("%(message)s"))
    log.addHandler(handler)
