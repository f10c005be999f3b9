"""Cloud providers through the real SDKs against fake upstreams on loopback."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from PIL import Image
from pydantic import SecretStr

from server.config import GeminiSettings, OpenAISettings, Prices
from server.job import ChatJob, ImageJob
from server.providers.base import ProviderError
from server.providers.gemini import GeminiProvider, nearest_aspect, retry_delay_from_details
from server.providers.openai import OpenAIProvider
from server.providers.pricing import (
    gemini_image_cost,
    local_cost,
    nearest_size,
    openai_image_cost,
    token_cost,
)
from server.providers.upstream import parse_retry_after, scrub
from tests.fakes.gemini_server import FakeGemini, inline_images, running_fake_gemini
from tests.fakes.openai_server import FakeOpenAI, image_url_parts, running_fake_openai

OPENAI_KEY = "sk-test-SECRET123456789"
# Fake keys in the real keys' shapes (the scrubber must recognise them), built from parts
# so that nothing in the tree reads as a live credential.
GEMINI_KEY = "AIza" + "TEST-SECRET-abcdefghijklmnop"
PRICES = Prices()
RED, BLUE = (220, 20, 20), (20, 20, 220)

T = TypeVar("T")
P = TypeVar("P", OpenAIProvider, GeminiProvider)


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def _openai_server() -> Iterator[FakeOpenAI]:
    with running_fake_openai() as fake:
        yield fake


@pytest.fixture(scope="module")
def _gemini_server() -> Iterator[FakeGemini]:
    with running_fake_gemini() as fake:
        yield fake


@pytest.fixture
def fake_openai(_openai_server: FakeOpenAI) -> FakeOpenAI:
    _openai_server.reset()
    _openai_server.hang_s = 3.0
    return _openai_server


@pytest.fixture
def fake_gemini(_gemini_server: FakeGemini) -> FakeGemini:
    _gemini_server.reset()
    _gemini_server.hang_s = 3.0
    return _gemini_server


def openai_provider(fake: FakeOpenAI, **overrides: Any) -> OpenAIProvider:
    settings: dict[str, Any] = {"api_key": SecretStr(OPENAI_KEY), "base_url": fake.base_url,
                                "timeout_s": 5.0}
    settings.update(overrides)
    return OpenAIProvider(OpenAISettings(**settings), PRICES)


def gemini_provider(fake: FakeGemini, **overrides: Any) -> GeminiProvider:
    settings: dict[str, Any] = {"api_key": SecretStr(GEMINI_KEY), "base_url": fake.url,
                                "timeout_s": 5.0}
    settings.update(overrides)
    return GeminiProvider(GeminiSettings(**settings), PRICES)


def run(provider: P, fn: Callable[[P], Awaitable[T]]) -> T:
    """One event loop per test: use the provider, then close it in the same loop."""
    async def main() -> T:
        try:
            return await fn(provider)
        finally:
            await provider.close()

    return asyncio.run(main())


def fails(provider: P, fn: Callable[[P], Awaitable[Any]]) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        run(provider, fn)
    return info.value


def image_job(n: int = 2, width: int = 512, height: int = 512, fmt: str = "png",
              quality: str = "auto", init: list[Image.Image] | None = None) -> ImageJob:
    return ImageJob(model="sdxl-turbo", prompt="a lighthouse at dusk", seeds=list(range(n)),
                    width=width, height=height, steps=1, quality=quality, output_format=fmt,
                    init_images=init or [], strength=0.5 if init else 0.0)


def chat_job(max_tokens: int = 64, **kw: Any) -> ChatJob:
    messages = [
        {"role": "system", "content": "You describe pictures tersely."},
        {"role": "user", "content": [{"type": "image"},
                                     {"type": "text", "text": "What colour is this?"}]},
    ]
    return ChatJob(model="gpt-4o-mini", messages=messages,
                   images=[Image.new("RGB", (40, 30), RED)], max_tokens=max_tokens, **kw)


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ---------------------------------------------------------------- pricing

def test_pricing() -> None:
    table = PRICES.openai_image
    assert openai_image_cost(PRICES, "low", "1024x1024", 1) == table["low"]["1024x1024"]
    assert openai_image_cost(PRICES, "auto", "1536x1024", 2) == 2 * table["medium"]["1536x1024"]
    assert openai_image_cost(PRICES, "standard", "1024x1536", 1) == \
        table["medium"]["1024x1536"]
    assert openai_image_cost(PRICES, "hd", "1024x1024", 3) == 3 * table["high"]["1024x1024"]
    assert openai_image_cost(PRICES, "high", "640x480", 1) == table["high"]["1024x1024"]
    assert gemini_image_cost(PRICES, 4) == pytest.approx(4 * PRICES.gemini_image)
    assert token_cost(PRICES, "openai", "gpt-4o-mini", 1_000_000, 2_000_000) == \
        pytest.approx(0.15 + 1.2)
    # not in the configured table: genai-prices' (gpt-4.1: $2 in, $8 out per million)
    assert token_cost(PRICES, "openai", "gpt-4.1", 1_000_000, 1_000_000) == pytest.approx(10.0)
    assert token_cost(PRICES, "openai", "no-such-model", 10**6, 10**6) is None
    assert local_cost(PRICES, 3600) == pytest.approx(PRICES.local_gpu_per_hour)


def test_gpt_image_1_mini_is_billed_at_its_own_prices(fake_openai: FakeOpenAI) -> None:
    """Not at gpt-image-1's (5x and more): the ledger's cost is what OpenAI bills."""
    job = image_job(n=2, width=512, height=512, quality="low")
    out = run(openai_provider(fake_openai), lambda p: p.generate_images(job, "gpt-image-1-mini"))
    assert out.cost_usd == pytest.approx(2 * 0.005)
    assert openai_image_cost(PRICES, "high", "1536x1024", 1, "gpt-image-1-mini") == 0.052
    assert openai_image_cost(PRICES, "high", "1536x1024", 1) == 0.25  # gpt-image-1


def test_helpers() -> None:
    assert nearest_size(512, 512) == "1024x1024"
    assert nearest_size(768, 512) == "1536x1024"
    assert nearest_size(512, 1024) == "1024x1536"
    assert nearest_aspect(1024, 576) == "16:9"
    assert nearest_aspect(512, 512) == "1:1"
    assert parse_retry_after({"retry-after": "12"}) == 12.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    assert retry_delay_from_details({"error": {"details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2.5s"}]}}) == 2.5
    assert retry_delay_from_details({"error": {"message": "x"}}) is None
    cleaned = scrub(f"bad key {OPENAI_KEY} and sk-other0123456789 and {GEMINI_KEY}")
    assert OPENAI_KEY not in cleaned and GEMINI_KEY not in cleaned and "sk-other" not in cleaned


# ---------------------------------------------------------------- OpenAI: success paths

@pytest.mark.parametrize(("fmt", "width", "height", "size", "quality"), [
    ("png", 512, 512, "1024x1024", "auto"),
    ("webp", 512, 768, "1024x1536", "hd"),
    ("jpeg", 768, 512, "1536x1024", "low"),
])
def test_openai_generate(fake_openai: FakeOpenAI, fmt: str, width: int, height: int,
                         size: str, quality: str) -> None:
    job = image_job(n=2, width=width, height=height, fmt=fmt, quality=quality)
    out = run(openai_provider(fake_openai), lambda p: p.generate_images(job, "gpt-image-1"))

    assert len(out.images) == 2
    for item in out.images:
        image = decoded(item.data)
        assert image.size == (width, height)
        assert image.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[fmt]
        assert item.media_type == f"image/{fmt}"
        assert item.seed is None
    assert out.model == "gpt-image-1"
    assert out.cost_usd == pytest.approx(openai_image_cost(PRICES, quality, size, 2))
    assert out.request_id == "req_fake_1"

    [call] = fake_openai.calls
    assert call.path == "/v1/images/generations"
    assert call.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    tier = {"auto": "medium", "hd": "high", "low": "low"}[quality]
    assert call.body == {"model": "gpt-image-1", "prompt": "a lighthouse at dusk", "n": 2,
                         "size": size, "quality": tier, "output_format": "png"}


def test_openai_generate_price_is_two_images(fake_openai: FakeOpenAI) -> None:
    out = run(openai_provider(fake_openai),
              lambda p: p.generate_images(image_job(n=2, quality="medium"), "gpt-image-1"))
    assert out.cost_usd == pytest.approx(2 * PRICES.openai_image["medium"]["1024x1024"])


@pytest.mark.parametrize("sources", [1, 2])
def test_openai_edit(fake_openai: FakeOpenAI, sources: int) -> None:
    init = [Image.new("RGB", (512, 512), c) for c in (RED, BLUE)[:sources]]
    job = image_job(n=2, init=init)
    out = run(openai_provider(fake_openai), lambda p: p.edit_images(job, "gpt-image-1"))
    assert [decoded(i.data).size for i in out.images] == [(512, 512)] * 2

    [call] = fake_openai.calls
    assert call.path == "/v1/images/edits"
    assert call.headers["content-type"].startswith("multipart/form-data")
    assert call.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    body = call.body
    assert body["prompt"] == "a lighthouse at dusk"
    assert body["n"] == "2" and body["size"] == "1024x1024" and body["model"] == "gpt-image-1"
    files = body["image"] if sources == 1 else body["image[]"]
    files = files if isinstance(files, list) else [files]
    assert len(files) == sources
    for f, colour in zip(files, (RED, BLUE), strict=False):
        assert f["content_type"] == "image/png"
        received = decoded(f["data"])
        assert received.size == (512, 512)
        assert received.getpixel((10, 10)) == colour


def test_openai_edit_with_a_mask_sends_it_transparent_where_to_repaint(
        fake_openai: FakeOpenAI) -> None:
    from dataclasses import replace

    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (0, 0, 256, 512))  # repaint the left half
    job = replace(image_job(n=1, init=[Image.new("RGB", (512, 512), RED)]), mask=mask)
    run(openai_provider(fake_openai), lambda p: p.edit_images(job, "gpt-image-1"))
    [call] = fake_openai.calls
    sent = Image.open(io.BytesIO(call.body["mask"]["data"]))
    assert sent.mode == "RGBA" and sent.size == (512, 512)
    assert sent.getpixel((10, 10))[3] == 0 and sent.getpixel((400, 10))[3] == 255


def test_openai_chat_with_image(fake_openai: FakeOpenAI) -> None:
    job = chat_job(temperature=0.3, top_p=0.9, stop=("END",), seed=42)
    out = run(openai_provider(fake_openai), lambda p: p.chat(job, "gpt-4o-mini"))

    assert out.text == "echo: What colour is this? [images: 1]"
    assert out.finish_reason == "stop"
    assert out.completion_tokens == 7
    assert out.prompt_tokens > 85
    assert out.cost_usd == pytest.approx(
        token_cost(PRICES, "openai", "gpt-4o-mini", out.prompt_tokens, out.completion_tokens))
    assert out.cost_usd > 0
    assert out.model == "gpt-4o-mini" and out.request_id == "req_fake_1"

    [call] = fake_openai.calls
    assert call.path == "/v1/chat/completions"
    body = call.body
    assert body["messages"][0] == {"role": "system", "content": "You describe pictures tersely."}
    user = body["messages"][1]["content"]
    assert user[0]["type"] == "image_url" and user[1] == {"type": "text",
                                                          "text": "What colour is this?"}
    [url] = image_url_parts(body)
    assert url.startswith("data:image/png;base64,")
    sent = decoded(base64.b64decode(url.split(",", 1)[1]))
    assert sent.size == (40, 30) and sent.getpixel((0, 0)) == RED
    assert body["max_completion_tokens"] == 64 and "max_tokens" not in body
    assert body["temperature"] == 0.3 and body["top_p"] == 0.9
    assert body["stop"] == ["END"] and body["seed"] == 42
    assert "stream" not in body


def test_openai_chat_length_and_no_stop(fake_openai: FakeOpenAI) -> None:
    out = run(openai_provider(fake_openai), lambda p: p.chat(chat_job(max_tokens=2), "gpt-4o"))
    assert out.finish_reason == "length" and out.completion_tokens == 2
    body = fake_openai.calls[0].body
    assert "stop" not in body and "seed" not in body


def test_openai_azure(fake_openai: FakeOpenAI) -> None:
    provider = openai_provider(fake_openai, base_url=None, azure_endpoint=fake_openai.url,
                               azure_api_version="2025-04-01-preview",
                               azure_deployments={"gpt-image-1": "img-prod",
                                                  "gpt-4o-mini": "vision-prod"})

    async def both(p: OpenAIProvider) -> tuple[Any, Any]:
        return (await p.generate_images(image_job(n=1), "gpt-image-1"),
                await p.chat(chat_job(), "gpt-4o-mini"))

    images, chat = run(provider, both)
    assert len(images.images) == 1 and images.model == "gpt-image-1"
    assert chat.text.startswith("echo:") and chat.model == "gpt-4o-mini"
    gen, conv = fake_openai.calls
    assert gen.path == "/openai/deployments/img-prod/images/generations"
    assert conv.path == "/openai/deployments/vision-prod/chat/completions"
    for call in (gen, conv):
        assert call.headers["api-key"] == OPENAI_KEY
        assert "authorization" not in call.headers
        assert call.query["api-version"] == "2025-04-01-preview"


def test_openai_azure_edit(fake_openai: FakeOpenAI) -> None:
    provider = openai_provider(fake_openai, base_url=None, azure_endpoint=fake_openai.url,
                               azure_deployments={"gpt-image-1": "img-prod"})
    job = image_job(n=1, init=[Image.new("RGB", (512, 512), RED)])
    run(provider, lambda p: p.edit_images(job, "gpt-image-1"))
    [call] = fake_openai.calls
    assert call.path == "/openai/deployments/img-prod/images/edits"
    assert call.headers["api-key"] == OPENAI_KEY and "api-version" in call.query


def test_openai_relay_base_url_only_from_settings(fake_openai: FakeOpenAI,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay at base_url gets the calls; the OPENAI_* environment cannot redirect them
    nor swap the key."""
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment-000")
    out = run(openai_provider(fake_openai),
              lambda p: p.generate_images(image_job(n=1), "relay-image-model"))
    assert out.model == "relay-image-model"
    [call] = fake_openai.calls
    assert call.path == "/v1/images/generations"
    assert call.body["model"] == "relay-image-model"
    assert call.headers["authorization"] == f"Bearer {OPENAI_KEY}"


def test_openai_needs_a_key() -> None:
    with pytest.raises(ValueError, match="not configured"):
        OpenAIProvider(OpenAISettings(), PRICES)
    with pytest.raises(ValueError, match="not configured"):
        GeminiProvider(GeminiSettings(), PRICES)


# ---------------------------------------------------------------- Gemini: success paths

@pytest.mark.parametrize("version", ["v1beta", "v1"])
def test_gemini_generate(fake_gemini: FakeGemini, version: str) -> None:
    job = image_job(n=2, width=768, height=512, fmt="webp")
    out = run(gemini_provider(fake_gemini, api_version=version),
              lambda p: p.generate_images(job, "gemini-2.5-flash-image"))

    assert len(out.images) == 2
    for item in out.images:
        image = decoded(item.data)
        assert image.size == (768, 512) and image.format == "WEBP"
        assert item.media_type == "image/webp" and item.seed is None
    assert out.model == "gemini-2.5-flash-image"
    assert out.cost_usd == pytest.approx(2 * PRICES.gemini_image)
    assert out.request_id is not None and out.request_id.startswith("resp_fake_")

    assert len(fake_gemini.calls) == 2
    for call in fake_gemini.calls:
        assert call.path == f"/{version}/models/gemini-2.5-flash-image:generateContent"
        assert call.headers["x-goog-api-key"] == GEMINI_KEY
        config = call.body["generationConfig"]
        assert "IMAGE" in config["responseModalities"]
        assert config["imageConfig"]["aspectRatio"] == "3:2"
        assert call.body["contents"][0]["parts"] == [{"text": "a lighthouse at dusk"}]
    # concurrent, not one after the other: both arrived before either could have waited
    assert abs(fake_gemini.calls[1].t - fake_gemini.calls[0].t) < 1.0


def test_gemini_edit(fake_gemini: FakeGemini) -> None:
    init = [Image.new("RGB", (512, 512), c) for c in (RED, BLUE)]
    job = image_job(n=2, init=init, fmt="jpeg")
    out = run(gemini_provider(fake_gemini),
              lambda p: p.edit_images(job, "gemini-2.5-flash-image"))
    assert [decoded(i.data).size for i in out.images] == [(512, 512)] * 2
    assert out.cost_usd == pytest.approx(2 * PRICES.gemini_image)

    received = []
    for call in fake_gemini.calls:
        [(mime, data)] = inline_images(call.body)
        assert mime == "image/png"
        image = decoded(data)
        assert image.size == (512, 512)
        received.append(image.getpixel((5, 5)))
        assert call.body["contents"][0]["parts"][1] == {"text": "a lighthouse at dusk"}
    assert sorted(received) == sorted([RED, BLUE])  # output i edits source i % 2


def test_gemini_chat(fake_gemini: FakeGemini) -> None:
    job = chat_job(temperature=0.2, top_p=0.8, stop=("END",), seed=7)
    job.messages.extend([{"role": "assistant", "content": "Red."},
                         {"role": "user", "content": "Sure?"}])
    out = run(gemini_provider(fake_gemini), lambda p: p.chat(job, "gemini-2.5-flash"))

    assert out.text == "echo: Sure? [images: 1]"
    assert out.finish_reason == "stop"
    assert out.completion_tokens == 4 and out.prompt_tokens > 258
    assert out.cost_usd == pytest.approx(
        token_cost(PRICES, "gemini", "gemini-2.5-flash", out.prompt_tokens,
                   out.completion_tokens))
    assert out.model == "gemini-2.5-flash"

    [call] = fake_gemini.calls
    assert call.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    body = call.body
    assert body["systemInstruction"]["parts"] == [{"text": "You describe pictures tersely."}]
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    [(mime, data)] = inline_images(body)
    assert mime == "image/png" and decoded(data).getpixel((0, 0)) == RED
    assert body["contents"][0]["parts"][1] == {"text": "What colour is this?"}
    config = body["generationConfig"]
    assert config["maxOutputTokens"] == 64 and config["temperature"] == 0.2
    assert config["topP"] == 0.8 and config["stopSequences"] == ["END"]
    assert config["seed"] == 7
    assert "responseModalities" not in config


def test_gemini_chat_max_tokens_is_length(fake_gemini: FakeGemini) -> None:
    out = run(gemini_provider(fake_gemini),
              lambda p: p.chat(chat_job(max_tokens=2), "gemini-2.5-flash"))
    assert out.finish_reason == "length" and out.completion_tokens == 2


def test_gemini_bad_key_is_auth(fake_gemini: FakeGemini) -> None:
    fake_gemini.expected_key = "AIza" + "SOMEONE-ELSES-KEY-123456"
    err = fails(gemini_provider(fake_gemini),
                lambda p: p.chat(chat_job(), "gemini-2.5-flash"))
    assert err.kind == "auth" and err.status == 400 and not err.trips_breaker


# ---------------------------------------------------------------- error mapping

KINDS = [("rate_limit", "rate_limited"), ("error500", "server"), ("error503", "server"),
         ("malformed", "malformed"), ("wrong_shape", "malformed"), ("auth", "auth")]


def _ops(provider: Any, kind: str) -> Callable[[Any], Awaitable[Any]]:
    model = {"openai": {"image": "gpt-image-1", "chat": "gpt-4o-mini"},
             "gemini": {"image": "gemini-2.5-flash-image", "chat": "gemini-2.5-flash"}}
    names = model[provider.name]
    if kind == "generate":
        return lambda p: p.generate_images(image_job(n=1), names["image"])
    if kind == "edit":
        job = image_job(n=1, init=[Image.new("RGB", (512, 512), RED)])
        return lambda p: p.edit_images(job, names["image"])
    return lambda p: p.chat(chat_job(), names["chat"])


@pytest.mark.parametrize(("mode", "kind"), KINDS)
@pytest.mark.parametrize("op", ["generate", "chat"])
def test_openai_errors(fake_openai: FakeOpenAI, mode: str, kind: str, op: str) -> None:
    fake_openai.set_mode(mode)
    fake_openai.retry_after = 11
    provider = openai_provider(fake_openai)
    err = fails(provider, _ops(provider, op))
    assert err.provider == "openai" and err.kind == kind
    assert len(fake_openai.calls) == 1  # the SDK does not retry: the router does
    if mode == "rate_limit":
        assert err.retry_after_s == 11 and err.status == 429
    if mode.startswith("error"):
        assert err.status == int(mode[-3:]) and err.trips_breaker


@pytest.mark.parametrize(("mode", "kind"), KINDS)
@pytest.mark.parametrize("op", ["generate", "chat"])
def test_gemini_errors(fake_gemini: FakeGemini, mode: str, kind: str, op: str) -> None:
    fake_gemini.set_mode(mode)
    fake_gemini.retry_after = 11
    provider = gemini_provider(fake_gemini)
    err = fails(provider, _ops(provider, op))
    assert err.provider == "gemini" and err.kind == kind
    assert len(fake_gemini.calls) == 1  # no SDK retries
    if mode == "rate_limit":
        assert err.retry_after_s == 11 and err.status == 429
    if mode.startswith("error"):
        assert err.status == int(mode[-3:]) and err.trips_breaker


def test_hang_is_timeout_on_both(fake_openai: FakeOpenAI, fake_gemini: FakeGemini) -> None:
    fake_openai.set_mode("hang")
    fake_gemini.set_mode("hang")
    for provider in (openai_provider(fake_openai, timeout_s=0.5),
                     gemini_provider(fake_gemini, timeout_s=0.5)):
        start = time.monotonic()
        err = fails(provider, _ops(provider, "generate"))
        assert err.kind == "timeout" and err.trips_breaker
        assert time.monotonic() - start < 3.0


def test_queued_modes_then_ok(fake_openai: FakeOpenAI, fake_gemini: FakeGemini) -> None:
    """Two failures, then success: one upstream call per provider call."""
    fake_openai.queue_modes(["error503", "rate_limit"])
    fake_gemini.queue_modes(["error503", "rate_limit"])

    async def three(p: Any) -> list[str]:
        kinds = []
        for _ in range(3):
            try:
                await _ops(p, "chat")(p)
                kinds.append("ok")
            except ProviderError as exc:
                kinds.append(exc.kind)
        return kinds

    assert run(openai_provider(fake_openai), three) == ["server", "rate_limited", "ok"]
    assert run(gemini_provider(fake_gemini), three) == ["server", "rate_limited", "ok"]
    assert len(fake_openai.calls) == 3 and len(fake_gemini.calls) == 3


def test_gemini_one_of_n_failing_fails_the_job(fake_gemini: FakeGemini) -> None:
    fake_gemini.queue_modes(["error500"])
    err = fails(gemini_provider(fake_gemini),
                lambda p: p.generate_images(image_job(n=3), "gemini-2.5-flash-image"))
    assert err.kind == "server"


# ---------------------------------------------------------------- the key never leaks

@pytest.mark.parametrize("which", ["openai", "gemini"])
def test_key_never_leaks(which: str, fake_openai: FakeOpenAI, fake_gemini: FakeGemini,
                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpx2", "httpcore", "httpcore2", "google_genai",
                 "server"):
        caplog.set_level(logging.DEBUG, logger=name)
    fake: FakeOpenAI | FakeGemini
    if which == "openai":
        fake, secret = fake_openai, OPENAI_KEY

        def make() -> Any:
            return openai_provider(fake_openai, timeout_s=0.5)
    else:
        fake, secret = fake_gemini, GEMINI_KEY

        def make() -> Any:
            return gemini_provider(fake_gemini, timeout_s=0.5)
    fake.echo_key = True  # a careless upstream repeats the key in its error messages
    fake.hang_s = 1.0

    errors: list[ProviderError] = []
    for mode in ("rate_limit", "error500", "error503", "malformed", "wrong_shape", "auth",
                 "hang"):
        fake.set_mode(mode)
        for op in ("generate", "edit", "chat"):
            provider = make()
            errors.append(fails(provider, _ops(provider, op)))
    assert {e.kind for e in errors} == {"rate_limited", "server", "malformed", "auth",
                                        "timeout"}
    assert any("[redacted]" in str(e) for e in errors)  # the echoes were there, and scrubbed
    for err in errors:
        assert secret not in str(err) and secret not in repr(err)
        assert secret not in "".join(traceback.format_exception(err))
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        if record.exc_info:
            text += "".join(traceback.format_exception(*record.exc_info))
        assert secret not in text, record.name
    assert secret not in caplog.text
