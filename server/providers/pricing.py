"""What a piece of work costs, in USD, from the configured ``Prices``. Pure functions."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TypeVar

from server.config import Prices, Settings, UpstreamSettings

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_OPENAI_SIZE = "1024x1024"

# The quality names clients send (DALL-E's and gpt-image's) -> the price tier.
_QUALITY_TIERS = {"low": "low", "medium": "medium", "high": "high",
                  "auto": "medium", "standard": "medium", "hd": "high"}


def lookup(table: Mapping[str, T], model: str) -> T | None:
    """A model's entry: by its exact name, else by its name in any case (GPT-Image-1)."""
    if model in table:
        return table[model]
    lowered = model.lower()
    return next((v for k, v in table.items() if k.lower() == lowered), None)


def openai_quality_tier(quality: str) -> str:
    """low/medium/high; auto and standard are medium, hd is high, anything else medium."""
    return _QUALITY_TIERS.get(quality.lower(), "medium")


def openai_image_cost(prices: Prices, quality: str, size_str: str, n: int,
                      model: str = "gpt-image-1") -> float:
    """n images of this OpenAI model at this quality and upstream size: the model's own
    table (``openai_image_models``), else gpt-image-1's; an unpriced size costs what
    1024x1024 does."""
    return _table_cost(prices.openai_image_models.get(model, prices.openai_image), quality,
                       size_str, n)


def gemini_image_cost(prices: Prices, n: int) -> float:
    return prices.gemini_image * max(n, 0)


# The price table for tokens: the operator's (an upstream's ``prices``, then the server's
# ``prices.tokens_per_million``) first, then genai-prices (MIT, pydantic's maintained table
# of LLM prices, tiers included), read from the snapshot in its wheel: nothing is fetched
# at serve time. Chosen over a hand-kept table, which had only four models and priced
# every other name at $0.
CATALOG_PROVIDERS = {"openai": "openai", "azure": "openai", "openai-compatible": "openai",
                     "gemini": "google", "anthropic": "anthropic"}


def _catalog_cost(provider: str, model: str, prompt_tokens: int,
                  completion_tokens: int) -> float | None:
    """genai-prices' price: under the provider's name, else under whichever provider
    publishes the model (a relay serving claude-* or gemini-* names)."""
    from genai_prices import Usage, calc_price

    usage = Usage(input_tokens=prompt_tokens, output_tokens=completion_tokens)
    for provider_id in dict.fromkeys((CATALOG_PROVIDERS.get(provider), None)):
        for name in dict.fromkeys((model, model.lower())):
            try:
                return float(calc_price(usage, model_ref=name, provider_id=provider_id)
                             .total_price)
            except LookupError:
                continue
    return None


def token_cost(prices: Prices, provider: str, model: str, prompt_tokens: int,
               completion_tokens: int) -> float | None:
    """What these tokens cost on ``provider``'s ``model``: the configured per-million
    input/output prices, else genai-prices' table; None when neither prices the model
    (such a model is never sent: server/routing/decide.py)."""
    prompt_tokens, completion_tokens = max(prompt_tokens, 0), max(completion_tokens, 0)
    rates = lookup(prices.tokens_per_million, model)
    if rates is None:
        return _catalog_cost(provider, model, prompt_tokens, completion_tokens)
    per_in, per_out = rates
    return (prompt_tokens * per_in + completion_tokens * per_out) / 1_000_000


def chat_cost(prices: Prices, up: UpstreamSettings, model: str, prompt_tokens: int,
              completion_tokens: int) -> float | None:
    """Tokens of ``model`` on this upstream: its own price, else the list price (server
    table, then genai-prices) times its ``factor``; None: unpriced, never sent."""
    own = lookup(up.prices.tokens_per_million, model)
    if own is not None:
        return (max(prompt_tokens, 0) * own[0] + max(completion_tokens, 0) * own[1]) / 1e6
    listed = token_cost(prices, up.kind, model, prompt_tokens, completion_tokens)
    return None if listed is None else listed * up.prices.factor


OPENAI_KINDS = ("openai", "azure", "openai-compatible")


def _table_cost(table: dict[str, dict[str, float]], quality: str, size: str, n: int) -> float:
    row = table.get(openai_quality_tier(quality)) or table.get("medium") or {}
    return row.get(size, row.get(DEFAULT_OPENAI_SIZE, 0.0)) * max(n, 0)


def image_cost(prices: Prices, up: UpstreamSettings, model: str, quality: str, width: int,
               height: int, n: int) -> float | None:
    """n images of ``model`` on this upstream at the size it would make them: its own
    table or price per image, else the list price times its ``factor``; None: unpriced."""
    size = upstream_size(model, width, height)
    own = lookup(up.prices.images, model)
    if own is not None:
        return _table_cost(own, quality, size, n)
    each = lookup(up.prices.image_each, model)
    if each is not None:
        return each * max(n, 0)
    listed: float | None = None
    if up.kind in OPENAI_KINDS:
        table = prices.openai_image if model.lower() == "gpt-image-1" else \
            lookup(prices.openai_image_models, model)
        listed = None if table is None else _table_cost(table, quality, size, n)
    elif up.kind == "gemini":
        each = lookup(prices.gemini_image_models, model)
        listed = (prices.gemini_image if each is None else each) * max(n, 0)
    return None if listed is None else listed * up.prices.factor


def image_usage_cost(prices: Prices, up: UpstreamSettings, model: str, text_in: int,
                     image_in: int, output: int) -> float | None:
    """What the tokens an image answer reports cost (gpt-image models report them); None
    where the upstream sets its own image price or the model has no token price."""
    rates = lookup(prices.image_tokens_per_million, model)
    if rates is None or lookup(up.prices.images, model) is not None \
            or lookup(up.prices.image_each, model) is not None:
        return None
    text_rate, image_rate, out_rate = rates
    cost = (max(text_in, 0) * text_rate + max(image_in, 0) * image_rate
            + max(output, 0) * out_rate) / 1_000_000
    return cost * up.prices.factor


def unpriced_models(settings: Settings) -> list[str]:
    """Every model an upstream names that has no price, as ``upstreams.N.field 'model'``:
    a server with one would send work at $0, so it does not start (``spillway serve``
    and ``spillway config check`` say which)."""
    found = []
    prices = settings.prices
    for i, up in enumerate(settings.clouds):
        where = f"upstreams.{i} ({up.name})" if settings.upstreams else up.name
        for model in up.named_models():
            image = image_cost(prices, up, model, "medium", 1024, 1024, 1) is not None
            chat = chat_cost(prices, up, model, 1, 1) is not None
            if model == up.image_model and not image:
                found.append(f"{where}.image_model {model!r}")
            elif model == up.vision_model and not chat:
                found.append(f"{where}.vision_model {model!r}")
            elif model not in (up.image_model, up.vision_model) and not (image or chat):
                found.append(f"{where}.models {model!r}")
    return found


def billed(provider: str, model: str, cost: float | None) -> float:
    """A cloud call's cost for the ledger. None cannot happen (an unpriced model is refused
    before it is sent); if it ever does, the answer still reaches its client and the log
    says so loudly, rather than the call failing after it was paid for."""
    if cost is None:
        log.error("%s answered with %s, which has no price: recorded at $0", provider, model)
        return 0.0
    return cost


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


DALLE3_SIZES = ("1024x1024", "1792x1024", "1024x1792")
DALLE2_SIDES = (256, 512, 1024)


def upstream_size(model: str, width: int, height: int) -> str:
    """The size an OpenAI image model is asked for: the one nearest the job's aspect
    among those it takes (DALL-E 2 makes squares only: the smallest that covers the
    job's longer side)."""
    name = model.lower()
    if name.startswith("dall-e-3"):
        return nearest_shape(width, height, DALLE3_SIZES, "x")
    if name.startswith("dall-e-2"):
        side = next((s for s in DALLE2_SIDES if s >= max(width, height)), DALLE2_SIDES[-1])
        return f"{side}x{side}"
    return nearest_size(width, height)
