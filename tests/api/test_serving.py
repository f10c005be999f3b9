"""Serving behaviour a user sees when the device is busy, slow, failing or loading.

The real tiny pipeline runs behind a gate the test controls, so "the device is busy"
is a fact of the test, not a race."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from pipelines.registry import MODEL_ID, WeightsInfo
from server.app import create_app
from server.config import BatchSettings, Settings
from server.providers.local.images import LocalImages
from server.providers.local.loading import batch_policy
from server.store.keys import KeyStore
from server.store.ledger import Ledger
from tests.api.gated import Device, wait_for
from tests.conftest import serve
from tests.ledger_rows import ledger_rows


def start(device: Device, weights: WeightsInfo, tiny_weights: Path, **batch: Any):
    settings = Settings(weights_dir=tiny_weights, batch=BatchSettings(**{"warmup": False, **batch}))
    local = LocalImages(MODEL_ID, weights, device.generate, batch_policy(settings),
                        settings.batch.default_timeout_s)
    return serve(create_app(settings, loader=lambda _: local)), local


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)


def gen(base: str, prompt: str, seed: int = 1, size: str = "256x256", n: int = 1
        ) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/generations", timeout=60,
                      json={"prompt": prompt, "seed": seed, "size": size, "n": n})


def hold_device(pool: ThreadPoolExecutor, device: Device, base: str) -> Future[httpx.Response]:
    """Close the gate and put one request on the device, so everything after queues."""
    device.gate.clear()
    device.busy.clear()
    blocker = pool.submit(gen, base, "blocker", 1, "512x512")
    assert device.busy.wait(30)
    return blocker


def pixels(resp: httpx.Response, i: int = 0) -> np.ndarray:
    raw = base64.b64decode(resp.json()["data"][i]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(raw))).astype(int)


def test_requests_queued_while_busy_run_as_one_batch(device, weights, tiny_weights) -> None:
    ctx, local = start(device, weights, tiny_weights)
    with ctx as base, ThreadPoolExecutor(12) as pool:
        blocker = hold_device(pool, device, base)
        waiting = [pool.submit(gen, base, f"prompt {i}", 100 + i) for i in range(8)]
        wait_for(lambda: local.batcher.snapshot().queued == 8)
        device.gate.set()
        together = [f.result() for f in waiting]
        assert blocker.result().status_code == 200
        assert all(r.status_code == 200 for r in together)
        # the eight requests that queued behind the busy device shared ONE pipeline call
        assert sorted(device.calls[1]) == sorted(f"prompt {i}" for i in range(8))
        assert len(device.calls) == 2
        for i, r in enumerate(together):
            assert r.json()["data"][0]["seed"] == 100 + i
            alone = gen(base, f"prompt {i}", 100 + i)
            assert np.abs(pixels(r) - pixels(alone)).max() <= 1


def test_full_queue_gets_429_with_retry_after(device, weights, tiny_weights) -> None:
    ctx, local = start(device, weights, tiny_weights, max_queue=10)
    with ctx as base, ThreadPoolExecutor(4) as pool:
        blocker = hold_device(pool, device, base)
        ten = pool.submit(gen, base, "ten", 1, "256x256", 10)
        wait_for(lambda: local.batcher.snapshot().queued == 10)
        with pytest.raises(openai.RateLimitError) as exc:
            sdk(base).images.generate(prompt="one more", size="256x256")
        assert int(exc.value.response.headers["retry-after"]) >= 1
        assert exc.value.body["code"] == "queue_full"  # type: ignore[index]
        assert exc.value.body["type"] == "rate_limit_error"  # type: ignore[index]
        device.gate.set()
        assert blocker.result().status_code == 200
        assert len(ten.result().json()["data"]) == 10
        # room again: the same request now succeeds
        assert sdk(base).images.generate(prompt="one more", size="256x256").data
    assert not any("one more" in p for call in device.calls[:2] for p in call)


def test_client_that_leaves_never_reaches_the_device(device, weights, tiny_weights) -> None:
    ctx, local = start(device, weights, tiny_weights)
    with ctx as base, ThreadPoolExecutor(4) as pool:
        blocker = hold_device(pool, device, base)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/images/generations", timeout=1.0,
                       json={"prompt": "abandoned", "size": "256x256", "n": 3})
        wait_for(lambda: local.batcher.snapshot().queued == 0)
        device.gate.set()
        assert blocker.result().status_code == 200
        assert gen(base, "after").status_code == 200
    assert all("abandoned" not in p for call in device.calls for p in call)


def test_a_client_that_leaves_is_accounted_and_gets_its_quota_back(
        device: Device, weights: WeightsInfo, tiny_weights: Path, tmp_path: Path) -> None:
    """The disconnect is raced at the edge (server/http/deps.py); the accounting under it
    still writes the request's row as 499 cancelled and gives back what it reserved."""
    url = f"sqlite:///{tmp_path}/l.db"
    key = KeyStore(Ledger(url)).create("three", daily_images=3)
    settings = Settings(weights_dir=tiny_weights, ledger_url=url)
    local = LocalImages(MODEL_ID, weights, device.generate, batch_policy(settings),
                        settings.batch.default_timeout_s)
    auth = {"authorization": f"Bearer {key}"}
    with serve(create_app(settings, loader=lambda _: local, chat_loader=None)) as base, \
            ThreadPoolExecutor(2) as pool:
        device.gate.clear()
        device.busy.clear()
        blocker = pool.submit(httpx.post, f"{base}/v1/images/generations", timeout=60,
                              headers=auth, json={"prompt": "blocker", "size": "256x256"})
        assert device.busy.wait(30)
        with pytest.raises(httpx.ReadTimeout):  # 2 of the key's 3 images, then it leaves
            httpx.post(f"{base}/v1/images/generations", timeout=1.0,
                       headers={**auth, "x-request-id": "rid-left"},
                       json={"prompt": "abandoned", "size": "256x256", "n": 2})
        wait_for(lambda: any(r.request_id == "rid-left" for r in ledger_rows(url)))
        device.gate.set()
        assert blocker.result().status_code == 200
        # the two images it reserved are free again: the key's last two go through
        again = httpx.post(f"{base}/v1/images/generations", timeout=60, headers=auth,
                           json={"prompt": "after", "size": "256x256", "n": 2})
        assert again.status_code == 200, again.text
    (left,) = [r for r in ledger_rows(url) if r.request_id == "rid-left"]
    assert (left.status, left.outcome, left.images, left.route) == (499, "cancelled", 0, "none")
    assert left.key_name == "three"
    assert all("abandoned" not in p for call in device.calls for p in call)


def test_item_that_waits_past_its_deadline_is_dropped(device, weights, tiny_weights) -> None:
    ctx, _ = start(device, weights, tiny_weights, default_timeout_s=0.5)
    with ctx as base, ThreadPoolExecutor(4) as pool:
        blocker = hold_device(pool, device, base)
        late = pool.submit(gen, base, "too late")
        time.sleep(1.0)
        device.gate.set()
        r = late.result()
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "queue_timeout"
        assert blocker.result().status_code in (200, 503)
    assert all("too late" not in p for call in device.calls for p in call)


def test_failing_batch_fails_only_its_requests(device, weights, tiny_weights) -> None:
    ctx, local = start(device, weights, tiny_weights)
    with ctx as base, ThreadPoolExecutor(4) as pool:
        blocker = hold_device(pool, device, base)
        bad = pool.submit(gen, base, "boom", 1, "256x256", 2)
        good = pool.submit(gen, base, "fine", 1, "320x320")
        wait_for(lambda: local.batcher.snapshot().queued == 3)
        device.gate.set()
        r = bad.result()
        assert r.status_code == 500
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "server_error" and "out of memory" in err["message"]
        assert good.result().status_code == 200
        assert blocker.result().status_code == 200
        # and the server keeps serving
        with pytest.raises(openai.InternalServerError):
            sdk(base).images.generate(prompt="boom again", size="256x256")
        assert sdk(base).images.generate(prompt="still here", size="256x256").data


def test_not_ready_until_loaded(weights, engine, tiny_weights) -> None:
    release = threading.Event()
    settings = Settings(weights_dir=tiny_weights)

    def slow_loader(s: Settings) -> LocalImages:
        assert release.wait(60)
        return LocalImages(MODEL_ID, weights, engine.generate, batch_policy(s), 60)

    with serve(create_app(settings, loader=slow_loader), wait_ready=False) as base:
        assert httpx.get(f"{base}/healthz").status_code == 200
        r = httpx.get(f"{base}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = gen(base, "early")
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "model_not_ready"
        release.set()
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200)
        assert gen(base, "now").status_code == 200


def test_failed_load_reports_failed(tiny_weights) -> None:
    def broken(_: Settings) -> LocalImages:
        raise FileNotFoundError("no weights")

    with serve(create_app(Settings(weights_dir=tiny_weights), loader=broken),
               wait_ready=False) as base:
        wait_for(lambda: httpx.get(f"{base}/readyz").json()["status"] == "failed")
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert gen(base, "x").status_code == 503
