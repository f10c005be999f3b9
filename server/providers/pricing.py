"""What a piece of work costs, in USD, from the configured ``Prices``. Pure functions."""

from __future__ import annotations

import math

from server.config import Prices

DEFAULT_OPENAI_SIZE = "1024x1024"

# The quality names clients send (DALL-E's and gpt-image's) -> the price tier.
_QUALITY_TIERS = {"low": "low", "medium": "medium", "high": "high",
                  "auto": "medium", "standard": "medium", "hd": "high"}


def openai_quality_tier(quality: str) -> str:
    """low/medium/high; auto and standard are medium, hd is high, anything else medium."""
    return _QUALITY_TIERS.get(quality.lower(), "medium")


def openai_image_cost(prices: Prices, quality: str, size_str: str, n: int) -> float:
    """n gpt-image images at this quality and upstream size; an unpriced size costs
    what 1024x1024 does."""
    table = prices.openai_image.get(openai_quality_tier(quality))
    if table is None:
        table = prices.openai_image.get("medium", {})
    each = table.get(size_str, table.get(DEFAULT_OPENAI_SIZE, 0.0))
    return each * max(n, 0)


def gemini_image_cost(prices: Prices, n: int) -> float:
    return prices.gemini_image * max(n, 0)


def token_cost(prices: Prices, model: str, prompt_tokens: int, completion_tokens: int) -> float:
    """Per-million input/output prices; a model without a price costs 0.0."""
    rates = prices.tokens_per_million.get(model)
    if rates is None:
        return 0.0
    per_in, per_out = rates
    return (max(prompt_tokens, 0) * per_in + max(completion_tokens, 0) * per_out) / 1_000_000


def local_cost(prices: Prices, device_seconds: float) -> float:
    return prices.local_gpu_per_hour * max(device_seconds, 0.0) / 3600.0


# gpt-image sizes, by aspect (width / height)
GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536")


def nearest_shape(width: int, height: int, choices: tuple[str, ...], sep: str) -> str:
    """The choice ("1536x1024", "3:2"...) whose aspect is nearest width / height."""
    aspect = math.log(width / height)

    def distance(choice: str) -> float:
        w, h = (int(v) for v in choice.split(sep))
        return abs(math.log(w / h) - aspect)

    return min(choices, key=distance)


def nearest_size(width: int, height: int) -> str:
    """The gpt-image size whose aspect is nearest the job's."""
    return nearest_shape(width, height, GPT_IMAGE_SIZES, "x")
