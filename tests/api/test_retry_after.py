"""A long drain is still a wait clients honour.

The local queue's drain estimate can be minutes (135 s under a burst of 380 requests);
the openai SDK does not retry at all when ``Retry-After`` says more than 120 s, and
google-genai's retries do not read it. The server says at most ``MAX_RETRY_AFTER_S``.
The device here is a gate, not a model: the queue is full because the test says so.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from pipelines.base import ImageItem, NotFinite, Picture
from pipelines.registry import MODEL_ID, WeightsInfo
from server.app import create_app
from server.config import Settings
from server.errors import queue_full
from server.providers.local.images import LocalImages
from server.providers.local.loading import batch_policy
from server.retry_after import MAX_RETRY_AFTER_S, retry_headers
from tests.api.gated import wait_for
from tests.conftest import serve

SIZE = "256x256"


class GatedDevice:
    """Makes blank pictures, but only once the gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.busy = threading.Event()

    def generate(self, items: list[ImageItem]) -> list[Picture | NotFinite]:
        self.busy.set()
        assert self.gate.wait(120)
        return [np.zeros((i.height, i.width, 3), np.uint8) for i in items]


class CountingRetries(openai.OpenAI):
    """The SDK's own retry decision and delay, recorded; only the sleep is skipped (the
    delay it chose is what the test checks, and waiting it out would take a minute)."""

    waits: list[float]

    def _calculate_retry_timeout(self, remaining_retries: int, options: Any,
                                 response_headers: Any = None) -> float:
        self.waits.append(super()._calculate_retry_timeout(remaining_retries, options,
                                                           response_headers))
        return 0.0


def generate(base: str, n: int) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/generations", timeout=120,
                      json={"prompt": "a queue", "size": SIZE, "n": n})


def refused_429s(base: str) -> int:
    """How many 429s the server has answered on /v1/images/generations (its metrics)."""
    text = httpx.get(f"{base}/metrics").text
    counts = [float(m.group(1)) for line in text.splitlines()
              if line.startswith("spillway_requests_total{")
              and 'endpoint="/v1/images/generations"' in line and 'status="429"' in line
              and (m := re.search(r"\}\s+([0-9.eE+]+)$", line))]
    return int(sum(counts))


@contextmanager
def full_queue(tmp_path: Path) -> Iterator[str]:
    """A server whose queue is full, with ~133 s of (estimated) work ahead: 10 items on
    the device, 256 waiting, at the batcher's prior of 0.5 s an item."""
    settings = Settings(weights_dir=tmp_path)
    device = GatedDevice()
    weights = WeightsInfo(MODEL_ID, "tiny", tmp_path)
    local = LocalImages(MODEL_ID, weights, device.generate, batch_policy(settings), 120)
    assert settings.batch.max_queue == 256
    with serve(create_app(settings, loader=lambda _: local, chat_loader=None)) as base, \
            ThreadPoolExecutor(32) as pool:
        waiting: list[Future[httpx.Response]] = [pool.submit(generate, base, 10)]
        try:
            assert device.busy.wait(30)
            waiting += [pool.submit(generate, base, 10) for _ in range(25)]
            waiting.append(pool.submit(generate, base, 6))
            wait_for(lambda: local.batcher.snapshot().queued == 256, timeout=60)
            assert local.batcher.estimated_wait([]) > 120  # more than the SDK would wait
            yield base
        finally:
            device.gate.set()
            assert all(f.result().status_code == 200 for f in waiting)


def test_long_drain_says_retry_within_the_cap_and_the_sdk_retries(tmp_path: Path) -> None:
    with full_queue(tmp_path) as base:
        raw = generate(base, 1)
        assert raw.status_code == 429
        assert 1 <= int(raw.headers["retry-after"]) <= MAX_RETRY_AFTER_S
        assert 1000 <= int(raw.headers["retry-after-ms"]) <= MAX_RETRY_AFTER_S * 1000
        before = refused_429s(base)

        client = CountingRetries(base_url=f"{base}/v1", api_key="x", max_retries=1,
                                 timeout=60)
        client.waits = []
        with pytest.raises(openai.RateLimitError):
            client.images.generate(prompt="one more", size=SIZE)
        # The SDK took the server's word: it retried once, after the advertised wait.
        assert refused_429s(base) - before == 2
        assert client.waits == [MAX_RETRY_AFTER_S]

        google = genai.Client(api_key="x", http_options=types.HttpOptions(
            base_url=base, api_version="v1", timeout=30_000))
        with pytest.raises(genai_errors.ClientError) as exc:
            google.models.generate_content(
                model="sdxl-turbo", contents="one more",
                config=types.GenerateContentConfig(response_modalities=["IMAGE"]))
        assert exc.value.code == 429
        details = exc.value.details["error"]["details"]
        [retry] = [d for d in details if d["@type"].endswith("google.rpc.RetryInfo")]
        assert 1 <= float(retry["retryDelay"].removesuffix("s")) <= MAX_RETRY_AFTER_S


@pytest.mark.parametrize(("estimate", "seconds", "ms"), [
    # a drain under a second is said to the millisecond (down to 100 ms) in retry-after-ms,
    # which the openai SDK reads first; Retry-After counts whole seconds, at least 1
    (0.0, "1", "100"), (0.3, "1", "300"), (-3.0, "1", "1000"), (float("nan"), "1", "1000"),
    (1.2, "2", "1200"), (42.0, "42", "42000"), (135.0, "60", "60000"),
    (float("inf"), "60", "60000")])
def test_retry_headers_are_capped(estimate: float, seconds: str, ms: str) -> None:
    assert retry_headers(estimate) == {"Retry-After": seconds, "retry-after-ms": ms}


def test_queue_full_quotes_the_drain_and_asks_for_the_cap() -> None:
    err = queue_full(135.0)
    assert err.status == 429 and err.headers["Retry-After"] == "60"
    assert "135 s" in err.message and "retry in about 60 s" in err.message
    assert queue_full(4.2).message == "The local queue is full; retry in about 5 s."
