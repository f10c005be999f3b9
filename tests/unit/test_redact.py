"""server/redact.py: every configured secret, in the disguises it leaks in, leaves no trace."""

from __future__ import annotations

import base64
import io
import logging
import urllib.parse

import pytest
from pydantic import SecretStr

from server.config import GeminiSettings, OpenAISettings, Settings
from server.providers.upstream import scrub
from server.redact import (
    CHATTY_LOGGERS,
    REDACTED,
    RedactingFilter,
    Redactor,
    install,
    quiet_chatty_loggers,
    settings_secrets,
)

# Built from parts so that nothing in the tree reads as a live credential.
KEY = "sk-" + "proj-Zx9AbCdEfGh1234567890"
ADMIN = "admin-" + "s3cret/with+odd=chars"


def disguises(secret: str) -> dict[str, str]:
    raw = secret.encode()
    half = len(secret) // 2
    b64 = base64.b64encode(raw).decode()
    return {
        "exact": secret,
        "upper": secret.upper(),
        "lower": secret.lower(),
        "mixed": "".join(c.upper() if i % 2 else c for i, c in enumerate(secret)),
        "reversed": secret[::-1],
        "reversed upper": secret[::-1].upper(),
        "base64": b64,
        "base64 unpadded": b64.rstrip("="),
        "urlsafe base64": base64.urlsafe_b64encode(raw).decode(),
        "basic auth": base64.b64encode(b"user:" + raw).decode(),
        "basic auth, 2 offset": base64.b64encode(b"me:" + raw).decode(),
        "base64 wrapped": "\n".join(b64[i:i + 8] for i in range(0, len(b64), 8)),
        "hex": raw.hex(),
        "HEX": raw.hex().upper(),
        "url-quoted": urllib.parse.quote(secret, safe=""),
        "split": f"{secret[:half]} {secret[half:]}",
        "spaced": " ".join(secret),
        "chunked": "\n".join(secret[i:i + 5] for i in range(0, len(secret), 5)),
    }


def leaked(text: str, secret: str) -> list[str]:
    """The disguises of ``secret`` still in ``text``: whole, or any 10-character run of
    the forms that keep the key's characters in order."""
    found = [name for name, form in disguises(secret).items() if form in text]
    squeezed = "".join(text.split()).lower()
    for form in (secret.lower(), secret[::-1].lower()):
        found += [f"run {form[i:i + 10]!r}" for i in range(len(form) - 9)
                  if form[i:i + 10] in squeezed]
    return found


@pytest.mark.parametrize("secret", [KEY, ADMIN])
@pytest.mark.parametrize("name", list(disguises(KEY)))
def test_every_disguise_is_redacted(secret: str, name: str) -> None:
    form = disguises(secret)[name]
    for text in (form, f"Incorrect API key provided: {form}.",
                 f'{{"error": {{"message": "bad key \\"{form}\\""}}}}',
                 f"Authorization: Basic {form}\r\nx-request-id: req_{form}"):
        out = Redactor([secret, "sk-other-key-0000000000"])(text)
        assert REDACTED in out
        assert leaked(out, secret) == [], (name, out)


def test_ordinary_text_is_left_alone() -> None:
    text = "openai: images.generate: HTTP 500: The server had an error (request req_42)"
    assert Redactor([KEY, ADMIN, "short"])(text) == text
    assert Redactor([])(text) == text


def test_short_secrets_only_in_their_exact_form() -> None:
    """A few characters in any case would match ordinary words: exact only."""
    redactor = Redactor(["pass1"])
    assert redactor("the password pass1 here") == f"the password {REDACTED} here"
    assert redactor("PASS1 and p a s s 1") == "PASS1 and p a s s 1"


def test_scrub_covers_the_disguises_and_stays_short() -> None:
    message = " ".join(disguises(KEY).values())
    cleaned = scrub(f"HTTP 401: {message}", [KEY])
    assert leaked(cleaned, KEY) == []
    assert len(cleaned) <= 303
    assert scrub("bad sk-someone-elses-key-123456 here") == f"bad {REDACTED} here"


def test_filter_on_a_handler_redacts_message_args_and_traceback() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(Redactor([KEY])))
    logger = logging.getLogger("tests.redact.child")  # propagates to its parent's handler
    parent = logging.getLogger("tests.redact")
    parent.addHandler(handler)
    parent.setLevel(logging.DEBUG)
    try:
        logger.debug("HTTP Response: headers %s", {"x-request-id": f"req_{KEY}"})
        logger.warning("upstream said %s", KEY.upper())
        try:
            raise ValueError(f"bad key {KEY[::-1]}")
        except ValueError:
            logger.exception("call failed")
        logger.info("stack", stack_info=True, extra={"key": KEY})
    finally:
        parent.removeHandler(handler)
    out = stream.getvalue()
    assert "HTTP Response" in out and "ValueError" in out and "call failed" in out
    assert out.count(REDACTED) >= 3
    assert leaked(out, KEY) == []


def test_install_reaches_every_handler_once() -> None:
    logger = logging.getLogger("tests.redact.install")
    handlers = [logging.StreamHandler(io.StringIO()), logging.StreamHandler(io.StringIO())]
    for h in handlers:
        logger.addHandler(h)
    flt = RedactingFilter(Redactor([KEY]))
    try:
        install(flt, ["tests.redact.install"])
        install(flt, ["tests.redact.install"])
        assert all(h.filters == [flt] for h in handlers)
    finally:
        for h in handlers:
            logger.removeHandler(h)


@pytest.mark.parametrize(("level", "expected"), [("debug", logging.WARNING),
                                                 ("info", logging.WARNING),
                                                 ("error", logging.ERROR)])
def test_chatty_loggers_stay_at_warning(level: str, expected: int) -> None:
    saved = {name: logging.getLogger(name).level for name in CHATTY_LOGGERS}
    try:
        quiet_chatty_loggers(level)
        for name in ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "google_genai",
                     "anthropic", "urllib3"):
            assert logging.getLogger(name).getEffectiveLevel() == expected
    finally:
        for name, lvl in saved.items():
            logging.getLogger(name).setLevel(lvl)


def test_settings_secrets_are_all_the_configured_ones() -> None:
    settings = Settings(openai=OpenAISettings(api_key=SecretStr(KEY)),
                        gemini=GeminiSettings(api_key=SecretStr("AIza-gemini-key-0000")),
                        admin_key=SecretStr(ADMIN),
                        ledger_url="postgresql://spill:db%2Fpass@db.local/ledger")
    assert set(settings_secrets(settings)) == {KEY, "AIza-gemini-key-0000", ADMIN,
                                               "db%2Fpass", "db/pass"}
    assert settings_secrets(Settings(ledger_url="sqlite://")) == []
