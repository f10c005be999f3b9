"""Secrets out of what we log and what we pass on: every configured key, in every disguise.

A key leaks in more shapes than its own: an upstream (or a relay) repeats it upper-cased,
reversed, base64'd (a Basic auth header), hex'd, or broken across whitespace; an exact
``str.replace`` misses all of them. ``Redactor`` finds each of these forms of each secret
and replaces it with ``[redacted]``. ``RedactingFilter`` puts one in front of a logging
handler, so no line leaves the process with a secret in it, whoever logged it; the
server's own messages go through ``scrub`` (server/providers/openai.py) too.
Third-party HTTP stacks log request and response headers at DEBUG: ``quiet_chatty_loggers``
keeps them at WARNING whatever the server's level is.
"""

from __future__ import annotations

import base64
import functools
import logging
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.config import Settings

REDACTED = "[redacted]"

# Below this many characters a secret is matched in its exact form only: its disguises
# (any case, spread over whitespace, a few base64 characters) would match ordinary words.
MIN_VARIANT_LEN = 8

# Loggers that print headers, URLs or bodies of the calls they make (at DEBUG, some at
# INFO): kept at WARNING or above, whatever SPILLWAY_LOG_LEVEL says.
CHATTY_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "h11", "h2", "hpack",
                  "urllib3", "requests", "aiohttp", "websockets", "openai", "anthropic",
                  "google_genai", "google.auth", "google_auth_httplib2", "multipart")


def _spread(text: str) -> str:
    """A pattern for ``text`` with any whitespace between its characters."""
    return r"\s*".join(re.escape(ch) for ch in text)


def _base64_cores(secret: bytes) -> list[str]:
    """The base64 characters that depend on ``secret`` alone, at each of the three offsets
    it can sit at inside a longer encoded string ("user:key" in a Basic header)."""
    cores = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret).decode("ascii")
        start = (8 * offset + 5) // 6  # characters that still carry prefix bits
        end = (8 * (offset + len(secret))) // 6  # the last one may carry what follows
        core = encoded[start:end]
        cores.append(core)
        cores.append(core.replace("+", "-").replace("/", "_"))  # the URL-safe alphabet
    return cores


def variant_patterns(secret: str) -> list[str]:
    """Regex sources that match ``secret`` in the forms it leaks in."""
    if not secret:
        return []
    if len(secret) < MIN_VARIANT_LEN:
        return [re.escape(secret)]
    raw = secret.encode("utf-8")
    # Case folds and whitespace do not hide a key, nor does reading it backwards.
    folded = [secret, secret[::-1], raw.hex()]
    quoted = urllib.parse.quote(secret, safe="")
    if quoted != secret:
        folded.append(quoted)
    patterns = [f"(?i:{_spread(text)})" for text in folded]
    patterns += [_spread(core) for core in dict.fromkeys(_base64_cores(raw))]
    return patterns


@functools.lru_cache(maxsize=64)
def _compiled(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    sources = [p for secret in secrets for p in variant_patterns(secret)]
    # Longest first: where one form contains another, the whole of it goes.
    sources.sort(key=len, reverse=True)
    return re.compile("|".join(sources)) if sources else None


class Redactor:
    """``redactor(text)``: the text with every form of every secret replaced."""

    def __init__(self, secrets: Iterable[str]) -> None:
        kept = sorted({s.strip() for s in secrets if s and s.strip()})
        self._pattern = _compiled(tuple(kept))

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(REDACTED, text)


def redact(text: str, secrets: Sequence[str]) -> str:
    return Redactor(secrets)(text)


class RedactingFilter(logging.Filter):
    """On a handler: each record's message (arguments merged), traceback and stack text
    are redacted before any formatter sees them. It never drops a record."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it, with no secret in it
            record.msg, record.args = "unformattable log message (redacted)", None
            return True
        record.msg, record.args = self.redactor(message), None
        if record.exc_info and not record.exc_text:
            # What a formatter would print, made now so it can be redacted; formatters
            # use exc_text when it is set.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor(record.stack_info)
        return True


def settings_secrets(settings: Settings) -> list[str]:
    """Every secret the configuration holds: upstream keys, the admin key, the ledger
    database's password."""
    secrets = [s.get_secret_value()
               for s in (settings.openai.api_key, settings.gemini.api_key, settings.admin_key,
                         *(up.api_key for up in settings.upstreams))
               if s is not None]
    try:
        password = urllib.parse.urlsplit(settings.ledger_url).password
    except ValueError:
        password = None
    if password:
        secrets += [password, urllib.parse.unquote(password)]
    return secrets


def install(filter_: logging.Filter,
            loggers: Sequence[str] = ("", "uvicorn", "uvicorn.error", "uvicorn.access",
                                      "spillway.access")) -> None:
    """Put ``filter_`` on every handler of these loggers (the root's by default, and
    those uvicorn and the access log set up): a handler filter sees every record that
    reaches the handler, propagated ones included, which a logger filter does not."""
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if filter_ not in handler.filters:
                handler.addFilter(filter_)


def quiet_chatty_loggers(level: int | str) -> None:
    """``CHATTY_LOGGERS`` at WARNING, or at ``level`` when that is higher."""
    numeric = level if isinstance(level, int) else logging.getLevelName(level.upper())
    floor = max(logging.WARNING, numeric if isinstance(numeric, int) else logging.WARNING)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(floor)
