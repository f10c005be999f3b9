"""GET /metrics: what a Prometheus scrape says after a known set of requests, sent with
the openai SDK to a real server (tiny pipeline behind a gate, fake OpenAI upstream)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from pipelines.registry import MODEL_ID, WeightsInfo
from server.app import create_app
from server.config import OpenAISettings, RateLimit, RouterSettings, Settings
from server.providers.local.images import LocalImages
from server.providers.local.loading import batch_policy
from tests.api.gated import Device, wait_for
from tests.conftest import serve
from tests.fakes.openai_server import running_fake_openai

GEN = "/v1/images/generations"
ROOMY = {m: RateLimit(per_minute=1000, burst=1000) for m in ("gpt-image-1", "gpt-4o-mini")}


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[Any]:
    with running_fake_openai() as oa:
        yield oa


@contextmanager
def server(tiny_weights: Path, device: Device, weights: WeightsInfo, oa: Any
           ) -> Iterator[str]:
    oa.reset()
    settings = Settings(
        weights_dir=tiny_weights, max_body_mb=0.01,
        openai=OpenAISettings(api_key=SecretStr("sk-test-metrics-0123456789"),
                              base_url=oa.base_url, timeout_s=2.0),
        router=RouterSettings(rate_limits=ROOMY, breaker_failures=1, breaker_cooldown_s=600))
    local = LocalImages(MODEL_ID, weights, device.generate, batch_policy(settings), 60)
    with serve(create_app(settings, loader=lambda _: local, chat_loader=None)) as base:
        yield base


def scrape(base: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)], as Prometheus would read it."""
    r = httpx.get(f"{base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    """The sum over the samples whose labels include ``labels``."""
    return sum(v for have, v in metrics.get(name, [])
               if all(have.get(k) == want for k, want in labels.items()))


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)


def test_metrics_count_exactly_the_requests_sent(tiny_weights, device, weights,
                                                 fake_openai) -> None:
    oa = fake_openai
    with server(tiny_weights, device, weights, oa) as base:
        client = sdk(base)
        assert value(scrape(base), "spillway_requests_total", endpoint=GEN) == 0
        client.images.generate(prompt="one", size="256x256", n=1)
        client.images.generate(prompt="two", size="256x256", n=2,
                               extra_headers={"x-request-id": "req-metrics-secret-id"})
        with pytest.raises(openai.BadRequestError):
            client.images.generate(prompt="bad", size="7x7")
        with pytest.raises(openai.NotFoundError):
            client.images.generate(prompt="x", model="no-such-model")
        too_big = httpx.post(f"{base}{GEN}", content=b"x" * 20_000,
                             headers={"content-type": "application/json"})
        assert too_big.status_code == 413
        assert httpx.get(f"{base}/no/such/path").status_code == 404
        spilled = client.images.with_raw_response.generate(prompt="hi", size="256x256",
                                                            quality="high")
        assert spilled.headers["x-spillway-route"] == "openai"
        chat = client.chat.completions.create(model="gpt-4o-mini", max_tokens=5,
                                              messages=[{"role": "user", "content": "hi"}])
        assert chat.usage is not None
        oa.set_mode("error500")  # one failure opens the circuit; local takes the request
        failed_over = client.images.with_raw_response.generate(prompt="f", size="256x256",
                                                               quality="high")
        assert failed_over.headers["x-spillway-route"] == "local"
        m = scrape(base)

    req = "spillway_requests_total"
    assert value(m, req, endpoint=GEN, status="200", route="local") == 3
    assert value(m, req, endpoint=GEN, status="200", route="openai") == 1
    assert value(m, req, endpoint=GEN, status="400", route="none") == 1
    assert value(m, req, endpoint=GEN, status="404") == 1
    assert value(m, req, endpoint=GEN, status="413") == 1  # refused before routing
    assert value(m, req, endpoint="unmatched", status="404") == 1
    assert value(m, req, endpoint="/v1/chat/completions", route="openai",
                 model="gpt-4o-mini") == 1
    assert value(m, req, endpoint=GEN) == 7
    assert value(m, "spillway_request_duration_seconds_count", endpoint=GEN,
                 route="local") == 3

    assert value(m, "spillway_images_total", route="local") == 4  # 1 + 2 + 1
    assert value(m, "spillway_images_total", route="openai") == 1
    assert value(m, "spillway_tokens_total", route="openai", kind="prompt") == \
        chat.usage.prompt_tokens
    assert value(m, "spillway_tokens_total", route="openai", kind="completion") == \
        chat.usage.completion_tokens
    assert value(m, "spillway_spills_total", provider="openai", reason="quality") == 1
    assert value(m, "spillway_spills_total", provider="openai", reason="explicit") == 1
    assert value(m, "spillway_spills_total") == 2  # the failed-over request ran locally
    cost = value(m, "spillway_cloud_cost_usd_total", provider="openai")
    assert cost == pytest.approx(float(spilled.headers["x-spillway-cost-usd"]) + (
        chat.usage.prompt_tokens * 0.15 + chat.usage.completion_tokens * 0.60) / 1e6,
        abs=2e-6)
    assert value(m, "spillway_circuit_state", provider="openai") == 2

    # every local image went through the batcher: items across batches == images
    assert value(m, "spillway_batch_size_count", model=MODEL_ID) >= 1
    assert value(m, "spillway_batch_size_sum", model=MODEL_ID) == 4
    assert value(m, "spillway_queue_wait_seconds_count", model=MODEL_ID) == 4
    assert value(m, "spillway_device_seconds_total", model=MODEL_ID) > 0
    assert value(m, "spillway_queue_depth", model=MODEL_ID) == 0
    assert [labels for labels, _ in m["spillway_estimated_wait_seconds"]] == [
        {"model": MODEL_ID}]
    assert value(m, "spillway_model_info", model=MODEL_ID, weights=weights.label) == 1
    assert value(m, "spillway_ready") == 1
    # labels are bounded: no request ids, no raw paths, no unknown model names
    every_label = {v for samples in m.values() for labels, _ in samples for v in labels.values()}
    assert "req-metrics-secret-id" not in every_label
    assert "/no/such/path" not in every_label and "no-such-model" not in every_label


def test_queue_depth_is_read_at_scrape_time(tiny_weights, device, weights,
                                            fake_openai) -> None:
    with server(tiny_weights, device, weights, fake_openai) as base, \
            ThreadPoolExecutor(2) as pool:
        device.gate.clear()
        device.busy.clear()
        first = pool.submit(sdk(base).images.generate, prompt="a", size="512x512")
        assert device.busy.wait(30)
        second = pool.submit(sdk(base).images.generate, prompt="b", size="256x256", n=3)
        wait_for(lambda: value(scrape(base), "spillway_queue_depth", model=MODEL_ID) == 3)
        m = scrape(base)
        assert value(m, "spillway_running_items", model=MODEL_ID) == 1
        assert value(m, "spillway_estimated_wait_seconds", model=MODEL_ID) > 0
        device.gate.set()
        assert len(first.result().data or []) == 1 and len(second.result().data or []) == 3
        assert value(scrape(base), "spillway_queue_depth", model=MODEL_ID) == 0


def test_each_app_has_its_own_registry(tiny_weights, device, weights, fake_openai) -> None:
    with server(tiny_weights, device, weights, fake_openai) as one:
        sdk(one).images.generate(prompt="x", size="256x256")
        with server(tiny_weights, device, weights, fake_openai) as two:
            assert value(scrape(one), "spillway_images_total") == 1
            assert value(scrape(two), "spillway_images_total") == 0


def test_a_client_that_leaves_mid_body_is_a_499_not_an_error(tiny_weights, device, weights,
                                                             fake_openai) -> None:
    """Half a body, then the connection closes: counted as 499 (client closed request),
    whichever way the endpoint reads its body, never as a 400 or 500."""
    paths = [GEN, "/v1/chat/completions", "/v1/images/edits",
             "/v1beta/models/gemini-2.5-flash:generateContent"]
    with server(tiny_weights, device, weights, fake_openai) as base:
        port = int(base.rsplit(":", 1)[1])
        for path in paths:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                          "\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"a".encode())
        m: dict[str, list[tuple[dict[str, str], float]]] = {}

        def all_counted() -> bool:
            m.update(scrape(base))
            return sum(value(m, "spillway_requests_total", method="POST", endpoint=p)
                       for p in (GEN, "/v1/chat/completions", "/v1/images/edits",
                                 "/v1beta/models/{model}:generateContent")) == len(paths)

        wait_for(all_counted)
        statuses = {labels["status"] for labels, v in m["spillway_requests_total"]
                    if labels["method"] == "POST" and v}
        assert statuses == {"499"}


def test_a_gemini_request_refused_at_intake_counts_under_its_url_model(
        tiny_weights, device, weights, fake_openai) -> None:
    with server(tiny_weights, device, weights, fake_openai) as base:
        for model in ("gemini-2.5-flash", "made-up-model"):
            r = httpx.post(f"{base}/v1beta/models/{model}:generateContent",
                           json={"contents": []})
            assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"
        m = scrape(base)
    gemini = "/v1beta/models/{model}:generateContent"
    req = "spillway_requests_total"
    assert value(m, req, endpoint=gemini, model="gemini-2.5-flash", status="400") == 1
    assert value(m, req, endpoint=gemini, model="other", status="400") == 1  # bounded
