"""Large images that every cap allows (6300x6300 = 39.7M pixels, under media.max_pixels),
several to a request, over real HTTP: the event loop keeps answering while they are
decoded and scaled, and the server holds at most media.max_decoding_pixels of them
decoded at once, queueing the rest and refusing (429, in the API's error shape) what
cannot get room in time."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from server.app import create_app
from server.config import Settings
from tests.conftest import serve

SIDE = 6300  # 39.69M pixels: under the 40M cap


@cache
def big_png() -> bytes:
    """A large image that compresses to little (130 KB): cheap to send, costly to decode."""
    buf = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def big_url() -> str:
    return "data:image/png;base64," + base64.b64encode(big_png()).decode()


def chat_body(images: int) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "What is this?"}]
    parts += [{"type": "image_url", "image_url": {"url": big_url(), "detail": "low"}}
              for _ in range(images)]
    return {"model": "local-vlm", "max_tokens": 1, "messages": [{"role": "user",
                                                                 "content": parts}]}


def settings_with(tiny_weights: Path, **media: Any) -> Settings:
    settings = Settings(weights_dir=tiny_weights)
    settings.images.min_side = 64
    for name, value in media.items():
        setattr(settings.media, name, value)
    return settings


def probe(base: str, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:
        while not stop.is_set():
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.monotonic() - started)
            stop.wait(0.05)


def test_large_images_leave_the_event_loop_free(tiny_weights: Path) -> None:
    with serve(create_app(settings_with(tiny_weights))) as base:
        latencies: list[float] = []
        stop = threading.Event()
        prober = threading.Thread(target=probe, args=(base, stop, latencies))
        prober.start()
        try:
            r = httpx.post(f"{base}/v1/chat/completions", json=chat_body(8), timeout=120)
        finally:
            stop.set()
            prober.join()
    assert r.status_code == 200, r.text
    assert len(latencies) > 5 and max(latencies) < 0.5, sorted(latencies)[-5:]


@pytest.fixture(scope="module")
def one_image_budget(tiny_weights: Path) -> Iterator[str]:
    """Room for one large image at a time, and no patience: the second image of a
    request cannot be admitted while the first one is being decoded."""
    settings = settings_with(tiny_weights, max_decoding_pixels=SIDE * SIDE,
                             decode_wait_s=0.05)
    with serve(create_app(settings)) as base:
        yield base


def test_beyond_the_budget_a_request_is_refused_to_retry(one_image_budget: str) -> None:
    base = one_image_budget
    r = httpx.post(f"{base}/v1/chat/completions", json=chat_body(3), timeout=120)
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("rate_limit_error", "intake_busy")
    assert error["param"].startswith("messages[0].content[")
    assert r.headers["retry-after"] == "1"

    files = [("image[]", (f"{i}.png", big_png(), "image/png")) for i in range(3)]
    r = httpx.post(f"{base}/v1/images/edits", data={"prompt": "x", "size": "64x64"},
                   files=files, timeout=120)
    assert r.status_code == 429 and r.json()["error"]["code"] == "intake_busy", r.text

    inline = {"inlineData": {"mimeType": "image/png",
                             "data": base64.b64encode(big_png()).decode()}}
    r = httpx.post(f"{base}/v1beta/models/local-vlm:generateContent", timeout=120, json={
        "contents": [{"parts": [{"text": "what?"}, inline, inline, inline]}],
        "generationConfig": {"maxOutputTokens": 1}})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    # Refused requests' decodes that had started still finish (and count until they
    # do); then the budget is whole again and one image at a time goes through.
    deadline = time.monotonic() + 30
    while (r := httpx.post(f"{base}/v1/chat/completions", json=chat_body(1),
                           timeout=120)).status_code == 429:
        assert time.monotonic() < deadline, "the budget never came back"
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def test_within_the_wait_images_queue_for_the_budget(tiny_weights: Path) -> None:
    settings = settings_with(tiny_weights, max_decoding_pixels=SIDE * SIDE,
                             decode_wait_s=60)
    with serve(create_app(settings, chat_loader=None)) as base:
        files = [("image[]", (f"{i}.png", big_png(), "image/png")) for i in range(3)]
        r = httpx.post(f"{base}/v1/images/edits", data={"prompt": "x", "size": "64x64"},
                       files=files, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["size"] == "64x64"
