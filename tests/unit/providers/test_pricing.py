"""What a cloud call costs on an upstream (server/providers/pricing.py): its own prices
first, then the list prices times its factor, then genai-prices for tokens; None where
nothing prices it (and it is never sent)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from server.config import Prices, Settings, UpstreamSettings
from server.providers.pricing import (
    chat_cost,
    image_cost,
    image_usage_cost,
    unpriced_models,
    upstream_size,
)

PRICES = Prices()


def up(kind: str = "openai", **kw: object) -> UpstreamSettings:
    extra = {"base_url": "http://r/v1"} if kind == "openai-compatible" else {}
    if kind == "azure":
        extra = {"azure_endpoint": "https://a.example"}
    return UpstreamSettings.model_validate({"name": "u", "kind": kind, "api_key": "k",
                                            **extra, **kw})


def test_dall_e_sizes_and_prices() -> None:
    assert upstream_size("dall-e-3", 512, 768) == "1024x1792"
    assert upstream_size("dall-e-3", 1024, 512) == "1792x1024"
    assert upstream_size("dall-e-2", 300, 200) == "512x512"
    assert upstream_size("dall-e-2", 2000, 2000) == "1024x1024"
    assert upstream_size("gpt-image-1", 512, 768) == "1024x1536"
    openai = up()
    assert image_cost(PRICES, openai, "dall-e-3", "auto", 512, 768, 2) == pytest.approx(0.16)
    assert image_cost(PRICES, openai, "dall-e-3", "hd", 512, 512, 1) == pytest.approx(0.08)
    assert image_cost(PRICES, openai, "dall-e-2", "high", 256, 256, 1) == pytest.approx(0.016)
    assert image_cost(PRICES, openai, "GPT-Image-1", "low", 512, 512, 1) == pytest.approx(0.011)


def test_an_image_model_without_a_price_has_none() -> None:
    assert image_cost(PRICES, up(), "gpt-4o-mini", "auto", 512, 512, 1) is None
    assert image_cost(PRICES, up("anthropic"), "claude-haiku-4-5", "auto", 512, 512, 1) is None
    # Gemini image models: their own price, else the server's per-image one
    gemini = up("gemini")
    assert image_cost(PRICES, gemini, "gemini-3-pro-image-preview", "auto", 512, 512, 2) == \
        pytest.approx(0.268)
    assert image_cost(PRICES, gemini, "gemini-9-image", "auto", 512, 512, 1) == 0.039


def test_an_upstreams_own_prices_then_its_factor() -> None:
    relay = up("openai-compatible", prices={
        "factor": 0.5, "image_each": {"sd3": 0.01},
        "images": {"gpt-image-1-mini": {"medium": {"1024x1024": 0.002}}},
        "tokens_per_million": {"gpt-4o-mini": [0.1, 0.2]}})
    assert image_cost(PRICES, relay, "gpt-image-1", "auto", 512, 512, 2) == pytest.approx(0.042)
    assert image_cost(PRICES, relay, "gpt-image-1-mini", "low", 512, 512, 1) == 0.002  # own
    assert image_cost(PRICES, relay, "sd3", "high", 800, 600, 3) == pytest.approx(0.03)
    assert chat_cost(PRICES, relay, "gpt-4o-mini", 10**6, 10**6) == pytest.approx(0.3)
    # list prices (the server's table, then genai-prices) times the factor
    assert chat_cost(PRICES, relay, "gpt-4o", 10**6, 0) == pytest.approx(1.25)
    assert chat_cost(PRICES, relay, "gpt-4.1", 10**6, 10**6) == pytest.approx(5.0)
    # a relay serving another vendor's names: genai-prices finds their publisher
    assert chat_cost(PRICES, relay, "claude-haiku-4-5", 10**6, 10**6) == pytest.approx(3.0)
    assert chat_cost(PRICES, relay, "no-such-model", 10, 10) is None


def test_reported_image_usage_is_billed_by_its_tokens() -> None:
    openai = up()
    # gpt-image-1: $5 text in, $10 image in, $40 out per million
    assert image_usage_cost(PRICES, openai, "gpt-image-1", 50, 1000, 4160) == pytest.approx(
        (50 * 5 + 1000 * 10 + 4160 * 40) / 1e6)
    assert image_usage_cost(PRICES, up(prices={"factor": 0.5}), "gpt-image-1-mini", 0, 0,
                            10**6) == pytest.approx(4.0)
    # no token price for DALL-E; an upstream's own image price wins over usage
    assert image_usage_cost(PRICES, openai, "dall-e-3", 1, 1, 1) is None
    own = up(prices={"image_each": {"gpt-image-1": 0.03}})
    assert image_usage_cost(PRICES, own, "gpt-image-1", 1, 1, 1) is None


def test_every_model_an_upstream_names_must_have_a_price(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    settings = Settings(upstreams=[
        up("openai-compatible", name="relay", image_model="flux-pro",
           vision_model="gpt-4o-mini", models=["gpt-image-1", "gpt-*", "mystery-7b"]),
        up("anthropic", name="claude", vision_model="claude-haiku-4-5")])
    assert unpriced_models(settings) == ["upstreams.0 (relay).image_model 'flux-pro'",
                                         "upstreams.0 (relay).models 'mystery-7b'"]
    legacy = Settings(openai={"api_key": SecretStr("k"), "image_model": "gpt-image-2"})
    assert unpriced_models(legacy) == ["openai.image_model 'gpt-image-2'"]
