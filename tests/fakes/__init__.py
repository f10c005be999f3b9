"""Fake cloud upstreams for tests: real HTTP on loopback, controllable failures.

Each fake runs a FastAPI app under uvicorn in a background thread and records every
call. Tests steer it between calls:

    with running_fake_openai() as fake:
        fake.set_mode("rate_limit")          # every call from now on
        fake.queue_modes(["error503"] * 2)   # the next two calls, then back to fake.mode
        ...
        assert fake.calls[-1].headers["authorization"] == "Bearer sk-..."

Modes: "ok", "rate_limit" (429 + Retry-After: ``retry_after``), "error500", "error503",
"hang" (answers nothing for ``hang_s`` seconds), "malformed" (200, not JSON),
"wrong_shape" (200, JSON of the wrong shape), "auth" (OpenAI 401, Gemini 403),
"redirect" (307 to ``redirect_to``, as a hostile relay might answer).
Other knobs: ``retry_after``, ``hang_s``, ``echo_key`` (error messages repeat the key
received, as a careless relay might), ``echo_variants`` (they repeat it upper-cased,
reversed, base64'd and split by whitespace too, and the OpenAI fake's ``x-request-id``
carries it: a hostile relay), ``expected_key`` (refuse any other key).
``running_canary()`` (tests.fakes.canary) is a server on another port that records
whatever reaches it: where a redirect points.
``reset()`` restores all of them and forgets the calls. ``fake.url`` is the root;
an OpenAI client's base_url is ``fake.base_url`` (``{url}/v1``), an Azure endpoint is
``fake.url``, a Gemini ``HttpOptions.base_url`` is ``fake.url``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI
from PIL import Image

MODES = ("ok", "rate_limit", "error500", "error503", "hang", "malformed", "wrong_shape", "auth",
         "redirect")


@dataclass(frozen=True)
class Call:
    """One request as the fake saw it. Unpacks as ``(t, path, headers, body)``;
    ``query`` (the query parameters) is an attribute only."""

    t: float  # time.monotonic() on arrival
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or for multipart {field: value | [values]} with files as dicts
    query: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.t, self.path, self.headers, self.body))

    def __getitem__(self, index: int) -> Any:
        return (self.t, self.path, self.headers, self.body)[index]


class FakeUpstream:
    """State shared by the fakes: the mode, the one-shot queue, the call log."""

    def __init__(self) -> None:
        self.url = ""
        self.calls: list[Call] = []
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._defaults()

    def _defaults(self) -> None:
        self.mode = "ok"
        self.retry_after = 7  # seconds, for "rate_limit"
        self.hang_s = 10.0  # for "hang"; cut short when the fake stops
        self.latency_s = 0.0  # every answer takes this long (a real upstream's ~2 s)
        self.echo_key = False  # error messages repeat the key they got (a careless relay)
        self.echo_variants = False  # ...and its disguises (a hostile relay); see key_variants
        self.redirect_to = ""  # where "redirect" sends the client (307, method and body kept)
        self.expected_key: str | None = None  # when set, any other key is refused

    def set_mode(self, mode: str) -> None:
        """Every call from now on, once any queued modes are used up."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        with self._lock:
            self.mode = mode

    def queue_modes(self, modes: Iterable[str]) -> None:
        """The next calls take these modes, one each; then ``mode`` again."""
        modes = list(modes)
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}")
        with self._lock:
            self._queue.extend(modes)

    def reset(self) -> None:
        """Back to "ok" with the default knobs, and forget the calls."""
        with self._lock:
            self._defaults()
            self._queue.clear()
            self.calls.clear()

    def calls_to(self, fragment: str) -> list[Call]:
        return [c for c in self.calls if fragment in c.path]

    def calls_between(self, start: float, end: float) -> list[Call]:
        return [c for c in self.calls if start <= c.t < end]

    # -- for the apps

    def record(self, path: str, headers: dict[str, str], body: Any,
               query: dict[str, str] | None = None) -> str:
        """Log a call; return the mode it gets."""
        with self._lock:
            self.calls.append(Call(time.monotonic(), path, headers, body, dict(query or {})))
            return self._queue.popleft() if self._queue else self.mode

    async def hang(self) -> None:
        deadline = time.monotonic() + self.hang_s
        while time.monotonic() < deadline and not self._stopping.is_set():
            await asyncio.sleep(0.02)


def key_variants(key: str) -> dict[str, str]:
    """The disguises a hostile relay (or a careless log line) gives a key: none of them
    is the key's exact text, all of them give it away."""
    half = len(key) // 2
    return {"upper": key.upper(), "lower": key.lower(), "reversed": key[::-1],
            "base64": base64.b64encode(key.encode()).decode("ascii"),
            "basic-auth": base64.b64encode(f"user:{key}".encode()).decode("ascii"),
            "split": f"{key[:half]} {key[half:]}",
            "spaced": " ".join(key[i:i + 4] for i in range(0, len(key), 4))}


def echo_of(fake: FakeUpstream, key: str) -> str:
    """What an error message repeats of the key it got, as the fake's knobs say."""
    if not key or not (fake.echo_key or fake.echo_variants):
        return ""
    said = [key] if fake.echo_key else []
    if fake.echo_variants:
        said += [f"{name} {value}" for name, value in key_variants(key).items()]
    return " (key " + "; ".join(said) + ")"


@functools.lru_cache(maxsize=256)  # a fake under load should not spend the CPU on PNGs
def png_b64(width: int, height: int, color: tuple[int, int, int] = (200, 60, 30)) -> str:
    image = Image.new("RGB", (width, height), color)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def color_for(i: int) -> tuple[int, int, int]:
    return ((40 + 70 * i) % 256, (90 + 50 * i) % 256, (160 + 30 * i) % 256)


def free_port() -> int:
    """As tests.conftest's (not imported: that pulls in the pipelines)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def run_app(app: FastAPI, fake: FakeUpstream) -> Iterator[str]:
    """Serve ``app`` on a free loopback port; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("fake upstream did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        fake._stopping.set()
        server.should_exit = True
        thread.join(10)
