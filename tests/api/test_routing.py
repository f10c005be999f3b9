"""The hybrid router end to end: a real server, the tiny local models behind a gate,
fake OpenAI and Gemini upstreams on loopback, the real openai SDK as the client."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from pydantic import SecretStr

from pipelines.registry import MODEL_ID, WeightsInfo
from server.app import create_app
from server.config import (
    BatchSettings,
    GeminiSettings,
    OpenAISettings,
    RateLimit,
    RouterSettings,
    Settings,
)
from server.providers.local.images import LocalImages
from server.providers.local.loading import batch_policy
from server.store.ledger import Ledger
from tests.api.gated import Device, wait_for
from tests.conftest import serve
from tests.fakes.gemini_server import running_fake_gemini
from tests.fakes.openai_server import running_fake_openai
from tests.ledger_rows import ledger_rows

OPENAI_KEY = "sk-test-routing-0123456789abcdef"
GEMINI_KEY = "test-gemini-routing-key-0123"
ROOMY = {m: RateLimit(per_minute=1000, burst=1000) for m in
         ("gpt-image-1", "gemini-2.5-flash-image", "gpt-4o-mini", "gemini-2.5-flash")}


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[Any, Any]]:
    with running_fake_openai() as oa, running_fake_gemini() as gm:
        yield oa, gm


@pytest.fixture(autouse=True)
def _reset(fakes: tuple[Any, Any]) -> None:
    for fake in fakes:
        fake.reset()


@contextmanager
def server(tiny_weights: Path, device: Device, weights: WeightsInfo, fakes: tuple[Any, Any],
           ledger: Path, *, keys: bool = True, max_queue: int = 64,
           **router: Any) -> Iterator[str]:
    oa, gm = fakes
    settings = Settings(
        weights_dir=tiny_weights, ledger_url=f"sqlite:///{ledger}",
        batch=BatchSettings(max_queue=max_queue, warmup=False),
        openai=OpenAISettings(api_key=SecretStr(OPENAI_KEY) if keys else None,
                              base_url=f"{oa.url}/v1", timeout_s=2.0),
        gemini=GeminiSettings(api_key=SecretStr(GEMINI_KEY) if keys else None,
                              base_url=gm.url, timeout_s=2.0),
        router=RouterSettings(**{"rate_limits": ROOMY, **router}))
    local = LocalImages(MODEL_ID, weights, device.generate, batch_policy(settings), 60)
    with serve(create_app(settings, loader=lambda _: local, chat_loader=None)) as base:
        yield base


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)


def gen(base: str, prompt: str = "x", deadline_ms: float | None = None, **body: Any
        ) -> httpx.Response:
    headers = {} if deadline_ms is None else {"x-spillway-max-wait-ms": str(deadline_ms)}
    return httpx.post(f"{base}/v1/images/generations", timeout=60, headers=headers,
                      json={"prompt": prompt, "size": "256x256", **body})


def queued(base: str) -> int:
    count: int = httpx.get(f"{base}/v1/models").json()["data"][0]["spillway"]["queued"]
    return count


def size_of(resp: httpx.Response, i: int = 0) -> tuple[int, int]:
    raw = base64.b64decode(resp.json()["data"][i]["b64_json"])
    return Image.open(io.BytesIO(raw)).size


# 1 ------------------------------------------------------------------------------------------
def test_explicit_cloud_models_and_high_quality(tiny_weights, device, weights, fakes,
                                                tmp_path) -> None:
    oa, gm = fakes
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db") as base:
        r = client(base).images.with_raw_response.generate(
            model="gpt-image-1", prompt="a red bicycle", size="512x512", n=2,
            response_format="b64_json")
        assert r.headers["x-spillway-route"] == "openai"
        assert float(r.headers["x-spillway-cost-usd"]) == pytest.approx(2 * 0.042)
        images = r.parse().data
        assert len(images) == 2
        for d in images:  # our shape and the asked size, whoever ran it
            im = Image.open(io.BytesIO(base64.b64decode(d.b64_json or "")))
            assert (im.format, im.size) == ("PNG", (512, 512))
        assert oa.calls_to("images/generations")[-1].headers["authorization"] == \
            f"Bearer {OPENAI_KEY}"

        g = gen(base, model="gemini-2.5-flash-image", n=1)
        assert g.headers["x-spillway-route"] == "gemini" and size_of(g) == (256, 256)
        assert float(g.headers["x-spillway-cost-usd"]) == pytest.approx(0.039)

        high = gen(base, quality="high")
        assert high.headers["x-spillway-route"] == "openai"
        assert float(high.headers["x-spillway-cost-usd"]) == pytest.approx(0.167)

        local = gen(base)  # no model, no quality: the local box
        assert local.headers["x-spillway-route"] == "local"
        assert float(local.headers["x-spillway-cost-usd"]) < 0.001

        chat = client(base).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", max_tokens=5,
            messages=[{"role": "user", "content": "hello"}])
        assert chat.headers["x-spillway-route"] == "openai"
        assert chat.parse().choices[0].message.content
        chat = client(base).chat.completions.with_raw_response.create(
            model="gemini-2.5-flash", max_tokens=5,
            messages=[{"role": "user", "content": "hello"}])
        assert chat.headers["x-spillway-route"] == "gemini"


# 2 ------------------------------------------------------------------------------------------
def test_exactly_the_late_requests_spill(tiny_weights, device, weights, fakes,
                                         tmp_path) -> None:
    """With the device blocked, each queued 256x256 image is estimated at the batcher's
    prior (0.5 s): request k waits (k+1) x 0.5 s. A 1.2 s deadline keeps two local."""
    oa, _ = fakes
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db") as base, \
            ThreadPoolExecutor(12) as pool:
        device.gate.clear()
        device.busy.clear()
        blocker = pool.submit(gen, base, "blocker", None, size="512x512")
        assert device.busy.wait(30)
        time.sleep(0.6)  # the running batch's own estimate has run out
        routes: list[str] = []
        futures = []
        for i in range(6):
            futures.append(pool.submit(gen, base, f"late {i}", 1200))
            if i < 2:  # the first two queue locally; wait until they have
                wait_for(lambda i=i: queued(base) == i + 1)
            else:
                routes.append(futures[-1].result().headers["x-spillway-route"])
        patient = pool.submit(gen, base, "patient", 60_000)
        wait_for(lambda: queued(base) == 3)
        device.gate.set()
        first_two = [f.result() for f in futures[:2]]
        assert [r.headers["x-spillway-route"] for r in first_two] == ["local", "local"]
        assert routes == ["openai"] * 4
        assert patient.result().headers["x-spillway-route"] == "local"
        assert all(r.status_code == 200 for r in first_two) and blocker.result().status_code == 200
        assert len(oa.calls_to("images/generations")) == 4


# 3 ------------------------------------------------------------------------------------------
def test_failing_provider_opens_its_circuit_then_a_trial_closes_it(
        tiny_weights, device, weights, fakes, tmp_path) -> None:
    oa, gm = fakes
    oa.set_mode("error500")
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db",
                breaker_failures=2, breaker_cooldown_s=1.5) as base:
        first = [gen(base, quality="high") for _ in range(2)]
        assert [r.headers["x-spillway-route"] for r in first] == ["local", "local"]  # failover
        assert len(oa.calls) == 2
        opened = gen(base, quality="high")  # circuit open: the other provider
        assert opened.headers["x-spillway-route"] == "gemini"
        assert len(oa.calls) == 2
        oa.set_mode("ok")
        time.sleep(1.6)
        trial = gen(base, quality="high")  # half-open: one trial, which succeeds
        assert trial.headers["x-spillway-route"] == "openai"
        after = gen(base, quality="high")
        assert after.headers["x-spillway-route"] == "openai"
        assert len(oa.calls) == 4


# 4 ------------------------------------------------------------------------------------------
def test_burst_never_exceeds_the_upstream_limit(tiny_weights, device, weights, fakes,
                                                tmp_path) -> None:
    oa, _ = fakes
    limits = {**ROOMY, "gpt-image-1": RateLimit(per_minute=5, burst=3, burst_window_s=10)}
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db",
                rate_limits=limits) as base, ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: gen(base, f"b{i}", model="gpt-image-1"), range(12)))
    assert all(r.status_code in (200, 429) for r in results)
    sent = sorted(c.t for c in oa.calls_to("images/generations"))
    assert len(sent) == 3  # the burst window admits 3; the rest ran locally or got 429
    assert sum(r.headers.get("x-spillway-route") == "openai" for r in results) == 3
    for t in sent:
        assert len([s for s in sent if t <= s < t + 10]) <= 3


# 5 ------------------------------------------------------------------------------------------
def test_spent_budget_stops_spilling_even_after_a_restart(tiny_weights, device, weights,
                                                          fakes, tmp_path) -> None:
    oa, gm = fakes
    budgets = {"openai": 0.05, "gemini": 0.0, "total": 1.0}
    ledger = tmp_path / "ledger.db"
    with server(tiny_weights, device, weights, fakes, ledger,
                daily_budget_usd=budgets) as base:
        spilled = gen(base, deadline_ms=0)  # the deadline cannot be met: spill
        assert spilled.headers["x-spillway-route"] == "openai"
        stays = gen(base, deadline_ms=0)  # 0.042 more would pass 0.05: wait locally
        assert stays.headers["x-spillway-route"] == "local"
    with server(tiny_weights, device, weights, fakes, ledger, daily_budget_usd=budgets,
                max_queue=10) as base, ThreadPoolExecutor(4) as pool:
        assert gen(base, deadline_ms=0).headers["x-spillway-route"] == "local"
        device.gate.clear()
        device.busy.clear()
        blocker = pool.submit(gen, base, "blocker", None, size="512x512")
        assert device.busy.wait(30)
        ten = pool.submit(gen, base, "ten", 0, n=10)
        wait_for(lambda: queued(base) == 10)
        full = gen(base, deadline_ms=0)  # no budget, no room: 429
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        device.gate.set()
        assert ten.result().headers["x-spillway-route"] == "local"
        assert blocker.result().status_code == 200
    assert len(oa.calls) == 1 and not gm.calls


# 6 ------------------------------------------------------------------------------------------
def test_failover_both_ways(tiny_weights, device, weights, fakes, tmp_path) -> None:
    oa, _ = fakes
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db") as base:
        for mode in ("error503", "hang", "malformed"):
            oa.set_mode(mode)
            r = gen(base, model="gpt-image-1")
            assert r.status_code == 200, (mode, r.text)
            assert r.headers["x-spillway-route"] == "local", mode
        oa.set_mode("ok")
        # the local pipeline fails (simulated CUDA OOM): the cloud answers instead
        r = gen(base, "boom on the GPU")
        assert r.status_code == 200 and r.headers["x-spillway-route"] == "openai"
        assert size_of(r) == (256, 256)


# 7 ------------------------------------------------------------------------------------------
def test_no_keys_local_only_and_cloud_models_get_a_clear_4xx(tiny_weights, device, weights,
                                                             fakes, tmp_path) -> None:
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db", keys=False) as base:
        assert gen(base, quality="high").headers["x-spillway-route"] == "local"
        assert gen(base, deadline_ms=0).headers["x-spillway-route"] == "local"
        with pytest.raises(openai.BadRequestError) as exc:
            client(base).images.generate(model="gpt-image-1", prompt="x")
        assert exc.value.body["code"] == "provider_not_configured"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError):
            client(base).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert not any(fake.calls for fake in fakes)


# 8 ------------------------------------------------------------------------------------------
def test_ledger_sums_equal_the_headers_and_failures_are_free(tiny_weights, device, weights,
                                                            fakes, tmp_path) -> None:
    oa, _ = fakes
    path = tmp_path / "ledger.db"
    headers_total = 0.0
    with server(tiny_weights, device, weights, fakes, path) as base:
        responses = [gen(base), gen(base, model="gpt-image-1", n=2),
                     gen(base, model="gemini-2.5-flash-image"), gen(base, quality="high")]
        oa.set_mode("error500")
        responses.append(gen(base, model="gpt-image-1"))  # fails upstream, runs locally
        for r in responses:
            assert r.status_code == 200
            headers_total += float(r.headers["x-spillway-cost-usd"])
        routes = [r.headers["x-spillway-route"] for r in responses]
        assert routes == ["local", "openai", "gemini", "openai", "local"]
    ledger = Ledger(f"sqlite:///{path}")
    try:
        rows = ledger_rows(ledger)
        assert len(rows) == 5
        assert sum(row.cost_usd for row in rows) == pytest.approx(headers_total, abs=1e-5)
        by_route = {t["group"]: t for t in ledger.totals(group_by="route")}
        assert by_route["openai"]["cost_usd"] == pytest.approx(2 * 0.042 + 0.167)
        assert by_route["gemini"]["cost_usd"] == pytest.approx(0.039)
        failed_over = [row for row in rows if row.reason == "failover"]
        assert len(failed_over) == 1 and failed_over[0].route == "local"
        assert failed_over[0].cost_usd < 0.001  # the failed upstream call is not charged
        assert all(row.cloud_equivalent_usd > 0 for row in rows)
    finally:
        ledger.close()


def test_upstream_429_is_honoured(tiny_weights, device, weights, fakes, tmp_path) -> None:
    oa, _ = fakes
    oa.set_mode("rate_limit")
    oa.retry_after = 30
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db") as base:
        first = gen(base, model="gpt-image-1")
        assert first.headers["x-spillway-route"] == "local"  # failover, not an error
        oa.set_mode("ok")
        # within the upstream's Retry-After nothing more is sent, though it is healthy now
        again = [gen(base, model="gpt-image-1") for _ in range(3)]
        assert [r.headers["x-spillway-route"] for r in again] == ["local"] * 3
        assert gen(base, quality="high").headers["x-spillway-route"] == "gemini"
    assert len(oa.calls) == 1
