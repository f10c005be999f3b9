"""Many upstreams at once (issue 14), end to end: a real server with the tiny local image
model behind a gate, and on loopback two OpenAI-compatible relays, an Azure resource,
OpenAI itself, Gemini and Claude, each a fake driven by the real SDK the server uses
(openai, AzureOpenAI, google-genai, anthropic). Clients are the real openai and
google-genai SDKs; what a user sees is the answer, ``x-spillway-route`` and the cost."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from google import genai
from google.genai import types
from PIL import Image

from pipelines.registry import MODEL_ID, WeightsInfo
from server.app import create_app
from server.config import BatchSettings, Settings
from server.providers.local.images import LocalImages
from server.providers.local.loading import batch_policy
from server.store.ledger import Ledger
from tests.api.gated import Device
from tests.conftest import serve
from tests.fakes.anthropic_server import FakeAnthropic, image_blocks, running_fake_anthropic
from tests.fakes.gemini_server import FakeGemini, running_fake_gemini
from tests.fakes.openai_server import FakeOpenAI, running_fake_openai
from tests.ledger_rows import ledger_rows

KEYS = {"RELAY_A_KEY": "sk-relay-a-0123456789", "RELAY_B_KEY": "sk-relay-b-0123456789",
        "AZURE_KEY": "azure-key-0123456789abcd", "OPENAI_KEY": "sk-openai-0123456789ab",
        # built from parts: a key-shaped literal would look like a leaked one in the tree
        "GEMINI_KEY": "AIza" + "FakeGeminiKey0123456789",
        "CLAUDE_KEY": "sk-ant-" + "fake-0123456789"}
ROOMY = {"per_minute": 1000, "burst": 1000}
ONE_A_MINUTE = {"per_minute": 1, "burst": 1}
LATE = {"x-spillway-max-wait-ms": "0"}  # no local run meets it: the job would be late


class Fakes:
    def __init__(self, stack: ExitStack) -> None:
        self.relay_a: FakeOpenAI = stack.enter_context(running_fake_openai())
        self.relay_b: FakeOpenAI = stack.enter_context(running_fake_openai())
        self.azure: FakeOpenAI = stack.enter_context(running_fake_openai())
        self.openai: FakeOpenAI = stack.enter_context(running_fake_openai())
        self.gemini: FakeGemini = stack.enter_context(running_fake_gemini())
        self.claude: FakeAnthropic = stack.enter_context(running_fake_anthropic())

    def all(self) -> list[Any]:
        return [self.relay_a, self.relay_b, self.azure, self.openai, self.gemini, self.claude]


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    with ExitStack() as stack:
        yield Fakes(stack)


@pytest.fixture(autouse=True)
def _keys_and_reset(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    for fake in fakes.all():
        fake.reset()


def upstreams(f: Fakes, **changes: dict[str, Any]) -> list[dict[str, Any]]:
    """Cheapest first: relay-a at half OpenAI's list prices, relay-b at 60%, Azure at list
    (dall-e-3 only, not for overflow), OpenAI itself (premium), Gemini, Claude (vision)."""
    listed: list[dict[str, Any]] = [
        {"name": "relay-a", "kind": "openai-compatible", "base_url": f.relay_a.base_url,
         "api_key_env": "RELAY_A_KEY", "tier": "economy", "prices": {"factor": 0.5},
         "models": ["gpt-image-1", "gpt-image-1-mini", "gpt-4o-mini"],
         "rate_limits": {"gpt-image-1": ROOMY, "gpt-image-1-mini": ROOMY}},
        {"name": "relay-b", "kind": "openai-compatible", "base_url": f.relay_b.base_url,
         "api_key_env": "RELAY_B_KEY", "tier": "economy", "prices": {"factor": 0.6},
         "models": ["gpt-image-1", "gpt-image-1-mini"],
         "rate_limits": {"gpt-image-1": ROOMY, "gpt-image-1-mini": ROOMY}},
        {"name": "azure", "kind": "azure", "azure_endpoint": f.azure.url,
         "api_key_env": "AZURE_KEY", "tier": "standard", "overflow": False,
         "image_model": "dall-e-3", "models": ["dall-e-3"],
         "upstream_models": {"dall-e-3": "dalle3-eastus"},
         "rate_limits": {"dall-e-3": ROOMY}},
        {"name": "openai", "kind": "openai", "base_url": f.openai.base_url,
         "api_key_env": "OPENAI_KEY", "tier": "premium",
         "rate_limits": {"gpt-image-1": ROOMY}},
        {"name": "gemini", "kind": "gemini", "base_url": f.gemini.url,
         "api_key_env": "GEMINI_KEY", "tier": "standard", "overflow": False,
         "rate_limits": {"gemini-2.5-flash-image": ROOMY}},
        {"name": "claude", "kind": "anthropic", "base_url": f.claude.url,
         "api_key_env": "CLAUDE_KEY", "tier": "premium"},
    ]
    for up in listed:
        up.update(changes.get(up["name"].replace("-", "_"), {}))
        up["timeout_s"] = 5.0
    return listed


@contextmanager
def server(tiny_weights: Path, device: Device, weights: WeightsInfo, f: Fakes, ledger: Path,
           *, router: dict[str, Any] | None = None, **changes: dict[str, Any]
           ) -> Iterator[str]:
    settings = Settings(
        weights_dir=tiny_weights, ledger_url=f"sqlite:///{ledger}",
        batch=BatchSettings(warmup=False), upstreams=upstreams(f, **changes),
        router={"breaker_failures": 1, "breaker_cooldown_s": 600,
                "daily_budget_usd": {"total": 100.0}, **(router or {})})
    local = LocalImages(MODEL_ID, weights, device.generate, batch_policy(settings), 60)
    with serve(create_app(settings, loader=lambda _: local, chat_loader=None)) as base:
        yield base


def gen(base: str, late: bool = True, **body: Any) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/generations", timeout=60,
                      headers=LATE if late else {},
                      json={"prompt": "a lighthouse", "size": "256x256", **body})


def route(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.headers["x-spillway-route"]


def cost(resp: httpx.Response) -> float:
    return float(resp.headers["x-spillway-cost-usd"])


def data_url(color: tuple[int, int, int] = (200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)


# -- overflow, tiers, rate limits ---------------------------------------------------------

def test_overflow_goes_to_the_cheapest_relay_then_the_next_then_premium(
        tiny_weights: Path, device: Device, weights: WeightsInfo, fakes: Fakes,
        tmp_path: Path) -> None:
    limited = {"rate_limits": {"gpt-image-1": ONE_A_MINUTE}}
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db",
                relay_a=limited, relay_b=limited) as base:
        assert route(gen(base, late=False)) == "local"  # on time: this box
        first = gen(base)
        assert route(first) == "relay-a" and cost(first) == pytest.approx(0.042 * 0.5)
        # relay-a has used its one a minute: the next relay, then past both: premium
        assert route(gen(base)) == "relay-b"
        third = gen(base)
        assert route(third) == "openai" and cost(third) == pytest.approx(0.042)
    # each got exactly one request, with its own key; Azure and Gemini take no overflow
    for fake, key in ((fakes.relay_a, "RELAY_A_KEY"), (fakes.relay_b, "RELAY_B_KEY"),
                      (fakes.openai, "OPENAI_KEY")):
        [call] = fake.calls
        assert call.headers["authorization"] == f"Bearer {KEYS[key]}"
        assert call.body["model"] == "gpt-image-1"
    assert not fakes.azure.calls and not fakes.gemini.calls


def test_bulk_tiers_keep_a_cheap_batch_off_premium(tiny_weights: Path, device: Device,
                                                  weights: WeightsInfo, fakes: Fakes,
                                                  tmp_path: Path) -> None:
    """A key of bulk priority is bulk work: with router.bulk_tiers local and economy, a
    late job takes a relay while one has a slot, then waits here, never premium."""
    from server.store.keys import KeyStore

    limited = {"rate_limits": {"gpt-image-1": ONE_A_MINUTE}}
    ledger = tmp_path / "l.db"
    store = Ledger(f"sqlite:///{ledger}")
    key = KeyStore(store).create("night", priority="bulk")
    store.engine.dispose()
    with server(tiny_weights, device, weights, fakes, ledger, relay_a=limited,
                relay_b=limited, router={"bulk_tiers": ["local", "economy"]}) as base:
        auth = {"authorization": f"Bearer {key}", **LATE}
        answers = [httpx.post(f"{base}/v1/images/generations", timeout=60, headers=auth,
                              json={"prompt": "x", "size": "256x256"}) for _ in range(3)]
    assert [route(r) for r in answers] == ["relay-a", "relay-b", "local"]
    assert not fakes.openai.calls


def test_a_critical_quality_goes_to_the_premium_tier(tiny_weights: Path, device: Device,
                                                     weights: WeightsInfo, fakes: Fakes,
                                                     tmp_path: Path) -> None:
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db") as base:
        high = gen(base, late=False, quality="high")
        assert route(high) == "openai" and cost(high) == pytest.approx(0.167)
        fakes.openai.set_mode("error500")
        # premium fails (its circuit opens): back here; the next goes to the best tier
        # left, the cheapest there (Gemini at 0.039 a picture, not DALL-E 3 hd at 0.08)
        assert route(gen(base, late=False, quality="high")) == "local"
        assert route(gen(base, late=False, quality="high")) == "gemini"
    assert len(fakes.openai.calls) == 2 and len(fakes.gemini.calls) == 1
    assert not fakes.azure.calls


def test_a_failing_relay_opens_its_circuit_and_traffic_moves_on(
        tiny_weights: Path, device: Device, weights: WeightsInfo, fakes: Fakes,
        tmp_path: Path) -> None:
    fakes.relay_a.set_mode("error503")
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db") as base:
        assert route(gen(base)) == "local"  # relay-a failed: the spill came back here
        assert [route(gen(base)) for _ in range(3)] == ["relay-b"] * 3
    assert len(fakes.relay_a.calls) == 1 and len(fakes.relay_b.calls) == 3


def test_a_named_model_goes_to_the_cheapest_upstream_serving_it_then_the_next(
        tiny_weights: Path, device: Device, weights: WeightsInfo, fakes: Fakes,
        tmp_path: Path) -> None:
    fakes.relay_a.set_mode("error500")
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db") as base:
        mini = gen(base, late=False, model="gpt-image-1-mini", quality="low")
        assert route(mini) == "relay-b"  # relay-a failed first; the next serving it
        assert cost(mini) == pytest.approx(0.005 * 0.6)
        dalle = gen(base, late=False, model="dall-e-3", size="512x768")
        assert route(dalle) == "azure"  # Azure and OpenAI at list price: Azure is listed first
        unpriced = gen(base, late=False, model="gpt-image-9")
        assert unpriced.status_code == 400
        assert unpriced.json()["error"]["code"] == "model_not_priced"
    assert [c.body["model"] for c in fakes.relay_a.calls] == ["gpt-image-1-mini"]
    [call] = fakes.azure.calls
    assert call.path == "/openai/deployments/dalle3-eastus/images/generations"
    assert call.headers["api-key"] == KEYS["AZURE_KEY"]
    # DALL-E 3 takes its own sizes (portrait: 1024x1792), standard or hd, and answers in
    # base64 only when asked
    assert call.body == {"model": "dalle3-eastus", "prompt": "a lighthouse", "n": 1,
                         "size": "1024x1792", "response_format": "b64_json",
                         "quality": "standard"}
    assert not fakes.openai.calls


# -- Claude ---------------------------------------------------------------------------------

def test_claude_answers_chat_with_images_through_the_openai_sdk(
        tiny_weights: Path, device: Device, weights: WeightsInfo, fakes: Fakes,
        tmp_path: Path) -> None:
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "what colour is this"},
            {"type": "image_url", "image_url": {"url": data_url()}}]}]
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db") as base:
        raw = client(base).chat.completions.with_raw_response.create(
            model="claude-haiku-4-5", messages=messages, max_tokens=50, temperature=0.3,
            stop=["STOP"])
        answer = raw.parse()
        assert raw.headers["x-spillway-route"] == "claude"
        assert answer.choices[0].message.content == \
            "echo: what colour is this [images: 1] (system: Be brief.)"
        usage = answer.usage
        assert usage is not None
        # genai-prices' Claude Haiku 4.5: $1 in, $5 out per million tokens
        assert float(raw.headers["x-spillway-cost-usd"]) == pytest.approx(
            (usage.prompt_tokens * 1.0 + usage.completion_tokens * 5.0) / 1e6, abs=1e-6)
        stream = client(base).chat.completions.create(
            model="claude-haiku-4-5", messages=messages, max_tokens=50, stream=True)
        pieces = [c.choices[0].delta.content for c in stream
                  if c.choices and c.choices[0].delta.content]
        # as Claude wrote it: a piece per word the fake sent, not one at the end
        assert len(pieces) == 10 and "".join(pieces) == answer.choices[0].message.content
    call = fakes.claude.calls[0]
    assert call.path == "/v1/messages"
    assert call.headers["authorization"] == f"Bearer {KEYS['CLAUDE_KEY']}"
    assert (call.body["system"], call.body["max_tokens"], call.body["temperature"],
            call.body["stop_sequences"]) == ("Be brief.", 50, 0.3, ["STOP"])
    [block] = image_blocks(call.body)
    assert block["source"]["media_type"] == "image/png"
    assert Image.open(io.BytesIO(base64.b64decode(block["source"]["data"]))).size == (32, 32)


def test_claude_streams_to_a_gemini_client_and_makes_no_images(
        tiny_weights: Path, device: Device, weights: WeightsInfo, fakes: Fakes,
        tmp_path: Path) -> None:
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db") as base:
        google = genai.Client(api_key="x", http_options=types.HttpOptions(
            base_url=base, api_version="v1beta"))
        chunks = list(google.models.generate_content_stream(
            model="claude-haiku-4-5", contents="hello there",
            config=types.GenerateContentConfig(max_output_tokens=40)))
        assert "".join(c.text or "" for c in chunks) == "echo: hello there [images: 0]"
        assert len([c for c in chunks if c.text]) == 5  # a piece per word
        image = gen(base, late=False, model="claude-haiku-4-5")
        assert image.status_code == 400 and image.json()["error"]["param"] == "model"
        seeded = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
            "model": "claude-haiku-4-5", "seed": 7,
            "messages": [{"role": "user", "content": "hi"}]})
        assert seeded.status_code == 400 and seeded.json()["error"]["param"] == "seed"
    assert len(fakes.claude.calls) == 1  # the stream; the refused ones never left


def test_a_claude_stream_that_fails_says_so_in_the_api_shape(
        tiny_weights: Path, device: Device, weights: WeightsInfo, fakes: Fakes,
        tmp_path: Path) -> None:
    body = {"model": "claude-haiku-4-5", "stream": True,
            "messages": [{"role": "user", "content": "hello there"}]}
    ledger = tmp_path / "l.db"
    with server(tiny_weights, device, weights, fakes, ledger,
                router={"breaker_failures": 5}) as base:
        fakes.claude.set_mode("error500")
        before = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
        # failed before its first piece: a plain error (no local VLM here to take it)
        assert before.status_code == 502 and before.json()["error"]["code"] == "upstream_error"
        fakes.claude.set_mode("ok")
        fakes.claude.fail_mid_stream = True
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body,
                          timeout=30) as during:
            assert during.status_code == 200 and during.headers["x-spillway-route"] == "claude"
            lines = [line for line in during.iter_lines() if line.startswith("data: ")]
    assert '"content":"echo:"' in lines[1].replace(" ", "")
    assert "upstream_error" in lines[-2] and lines[-1] == "data: [DONE]"
    store = Ledger(f"sqlite:///{ledger}")
    try:
        outcomes = [(r.route, r.outcome, r.status) for r in ledger_rows(store)]
    finally:
        store.engine.dispose()
    assert sorted(outcomes) == [("claude", "error", 502), ("none", "error", 502)]


# -- money ----------------------------------------------------------------------------------

def test_ledger_sums_equal_the_header_costs_per_upstream(tiny_weights: Path, device: Device,
                                                        weights: WeightsInfo, fakes: Fakes,
                                                        tmp_path: Path) -> None:
    ledger_path = tmp_path / "l.db"
    fakes.openai.report_usage = True  # gpt-image-1 reports its tokens: billed by them
    headers: dict[str, float] = {}
    with server(tiny_weights, device, weights, fakes, ledger_path,
                relay_a={"rate_limits": {"gpt-image-1": ONE_A_MINUTE}}) as base:
        answers = [gen(base), gen(base, n=2), gen(base, late=False, quality="high"),
                   gen(base, late=False, model="gemini-2.5-flash-image"),
                   gen(base, late=False, model="dall-e-3")]
        chat = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
            "model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]})
        for resp in [*answers, chat]:
            headers[route(resp)] = headers.get(route(resp), 0.0) + cost(resp)
        usage = httpx.get(f"{base}/v1/usage", params={"group_by": "route"}).json()
        metrics = httpx.get(f"{base}/metrics").text
    assert set(headers) == {"relay-a", "relay-b", "openai", "gemini", "azure", "claude"}
    # the premium high-quality image was billed by its reported tokens, not the table
    tokens = 50 * 5.0 + 4160 * 40.0
    assert headers["openai"] == pytest.approx(tokens / 1e6, abs=1e-6)
    ledger = Ledger(f"sqlite:///{ledger_path}")
    try:
        by_route = {t["group"]: t["cost_usd"] for t in ledger.totals(group_by="route")}
        assert len(ledger_rows(ledger)) == 6
    finally:
        ledger.engine.dispose()
    for name, total in headers.items():
        assert round(by_route[name], 2) == round(total, 2)
        assert by_route[name] == pytest.approx(total, abs=1e-6)
    listed = {row["group"]: row for row in usage["data"]}
    assert listed["relay-b"]["images"] == 2 and listed["claude"]["requests"] == 1
    assert 'spillway_cloud_cost_usd_total{provider="relay-b"}' in metrics


def test_budgets_per_upstream_hold_across_a_restart(tiny_weights: Path, device: Device,
                                                   weights: WeightsInfo, fakes: Fakes,
                                                   tmp_path: Path) -> None:
    ledger = tmp_path / "l.db"
    tight = {"daily_budget_usd": 0.03}  # one image at 0.021, not two
    with server(tiny_weights, device, weights, fakes, ledger, relay_a=tight) as base:
        assert [route(gen(base)) for _ in range(2)] == ["relay-a", "relay-b"]
    with server(tiny_weights, device, weights, fakes, ledger, relay_a=tight) as base:
        assert route(gen(base)) == "relay-b"  # what relay-a spent today came back
        dashboard = httpx.get(f"{base}/v1/dashboard").json()
    assert len(fakes.relay_a.calls) == 1
    rows = {c["name"]: c for c in dashboard["clouds"]}
    assert rows["relay-a"]["spent_today_usd"] == pytest.approx(0.021)
    assert (rows["relay-a"]["budget_usd"], rows["relay-a"]["tier"]) == (0.03, "economy")
    assert rows["relay-b"]["requests_today"] == 2 and rows["claude"]["kind"] == "anthropic"


def test_the_total_budget_holds_across_a_restart(tiny_weights: Path, device: Device,
                                                 weights: WeightsInfo, fakes: Fakes,
                                                 tmp_path: Path) -> None:
    ledger = tmp_path / "l.db"
    total = {"daily_budget_usd": {"total": 0.05}}
    with server(tiny_weights, device, weights, fakes, ledger, router=total) as base:
        assert [route(gen(base)) for _ in range(2)] == ["relay-a", "relay-a"]  # 0.042
    with server(tiny_weights, device, weights, fakes, ledger, router=total) as base:
        assert route(gen(base)) == "local"  # 0.021 more would pass 0.05
    assert len(fakes.relay_a.calls) == 2


# -- the Batch API ----------------------------------------------------------------------------

def test_a_batch_names_the_tiers_it_may_use(tiny_weights: Path, device: Device,
                                            weights: WeightsInfo, fakes: Fakes,
                                            tmp_path: Path) -> None:
    """An overnight batch that says "economy": its items go to the relays (cheapest first),
    none to premium and none here; a tier that does not exist is a 400 naming it."""
    import json
    import time

    lines = b"".join(json.dumps({"custom_id": str(i), "method": "POST",
                                 "url": "/v1/images/generations",
                                 "body": {"prompt": f"p{i}", "size": "256x256",
                                          "quality": "high"}}).encode() + b"\n"
                     for i in range(3))
    with server(tiny_weights, device, weights, fakes, tmp_path / "l.db") as base:
        sdk = client(base)
        f = sdk.files.create(file=("r.jsonl", lines), purpose="batch")
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.batches.create(input_file_id=f.id, endpoint="/v1/images/generations",
                               completion_window="24h", metadata={"spillway_tiers": "gold"})
        assert "'gold'" in exc.value.message
        batch = sdk.batches.create(input_file_id=f.id, endpoint="/v1/images/generations",
                                   completion_window="24h",
                                   metadata={"spillway_tiers": "economy"})
        deadline = time.monotonic() + 60
        while (batch := sdk.batches.retrieve(batch.id)).status != "completed":
            assert time.monotonic() < deadline and batch.status in (
                "validating", "in_progress", "finalizing")
            time.sleep(0.1)
        assert batch.request_counts is not None and batch.request_counts.completed == 3
        # the ledger's rows are written in groups, a moment after the items finish
        while True:
            rows = httpx.get(f"{base}/v1/usage", params={"group_by": "route"}).json()["data"]
            if sum(r["requests"] for r in rows) >= 3:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # "high" is a critical quality: the best tier the batch allows is economy, cheapest first
    assert {r["group"]: r["requests"] for r in rows} == {"relay-a": 3}
    assert len(fakes.relay_a.calls) == 3 and not fakes.openai.calls and not device.calls
