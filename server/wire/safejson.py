"""JSON from outside, parsed so that no input can crash what parses it.

Python's ``json`` accepts what later breaks other code: ``"\\ud800"`` (a lone surrogate)
decodes to a ``str`` that no UTF-8 encoder, database driver or tokenizer takes, and input
nested 100,000 deep raises ``RecursionError`` (not ``ValueError``), in the parser or in
whatever walks the result next (``json.dumps`` when it is stored, pydantic). Every JSON
document a client sends (request bodies, batch lines) goes through ``parse`` or, when a
framework parsed it already, ``check``: both turn every such input into one ``JSONError``
whose message names where the problem is.
"""

from __future__ import annotations

import json
from typing import Any

# Deeper than any request we serve needs (a chat message with content parts is ~6 deep; a
# JSON schema in a request may nest a few dozen), far below the interpreter's limit.
MAX_DEPTH = 64


class JSONError(ValueError):
    """The document is not JSON we accept; ``path`` is where (``messages[0].content``)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


def parse(raw: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` plus ``check``; every failure is a ``JSONError``."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise JSONError(f"The JSON is nested more than {max_depth} levels deep.") from None
    except UnicodeDecodeError:
        raise JSONError("The JSON is not valid UTF-8.") from None
    except ValueError as exc:
        raise JSONError(f"The JSON is not valid: {exc}.") from None
    check(value, max_depth=max_depth)
    return value


def check(value: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """Refuse nesting beyond ``max_depth`` and strings (keys included) that are not valid
    Unicode. Iterative, so depth itself cannot exhaust the stack."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, str):
            _check_text(node, path)
            continue
        if not isinstance(node, dict | list):
            continue
        if depth > max_depth:
            raise JSONError(f"The JSON is nested more than {max_depth} levels deep.",
                            path or None)
        if isinstance(node, dict):
            for key, child in node.items():
                # The path goes back to the client in an error: never a bad key in it.
                name = shown(str(key))[:100]
                where = f"{path}.{name}" if path else name
                if isinstance(key, str):
                    _check_text(key, where)
                stack.append((child, depth + 1, where))
        else:
            for i, child in enumerate(node):
                stack.append((child, depth + 1, f"{path}[{i}]"))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JSONError(f"Invalid text: a lone surrogate (\\u{ord(text[exc.start]):04x}) at "
                        f"character {exc.start} is not a Unicode character.",
                        path or None) from None


def shown(text: str) -> str:
    """``text`` safe to send or store: a lone surrogate is written as its escape (``\\ud800``)."""
    if valid_text(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def valid_text(text: str) -> bool:
    """True when ``text`` can be stored and encoded (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
