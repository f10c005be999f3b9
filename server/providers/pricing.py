"""What a piece of work costs, in USD, from the configured ``Prices``. Pure functions."""

from __future__ import annotations

import logging
import math

from server.config import Prices, Settings

log = logging.getLogger(__name__)

DEFAULT_OPENAI_SIZE = "1024x1024"

# The quality names clients send (DALL-E's and gpt-image's) -> the price tier.
_QUALITY_TIERS = {"low": "low", "medium": "medium", "high": "high",
                  "auto": "medium", "standard": "medium", "hd": "high"}


def openai_quality_tier(quality: str) -> str:
    """low/medium/high; auto and standard are medium, hd is high, anything else medium."""
    return _QUALITY_TIERS.get(quality.lower(), "medium")


def openai_image_cost(prices: Prices, quality: str, size_str: str, n: int,
                      model: str = "gpt-image-1") -> float:
    """n images of this OpenAI model at this quality and upstream size: the model's own
    table (``openai_image_models``), else gpt-image-1's; an unpriced size costs what
    1024x1024 does."""
    tiers = prices.openai_image_models.get(model, prices.openai_image)
    table = tiers.get(openai_quality_tier(quality))
    if table is None:
        table = tiers.get("medium", {})
    each = table.get(size_str, table.get(DEFAULT_OPENAI_SIZE, 0.0))
    return each * max(n, 0)


def gemini_image_cost(prices: Prices, n: int) -> float:
    return prices.gemini_image * max(n, 0)


# The price table for tokens: the operator's (``prices.tokens_per_million``) first, then
# genai-prices (MIT, pydantic's maintained table of LLM prices, tiers included), read from
# the snapshot in its wheel: nothing is fetched at serve time. Chosen over a hand-kept
# table, which had only four models and priced every other name at $0.
CATALOG_PROVIDERS = {"openai": "openai", "gemini": "google", "anthropic": "anthropic"}


def _catalog_cost(provider: str, model: str, prompt_tokens: int,
                  completion_tokens: int) -> float | None:
    from genai_prices import Usage, calc_price

    try:
        price = calc_price(Usage(input_tokens=prompt_tokens, output_tokens=completion_tokens),
                           model_ref=model, provider_id=CATALOG_PROVIDERS.get(provider))
    except LookupError:
        return None
    return float(price.total_price)


def token_cost(prices: Prices, provider: str, model: str, prompt_tokens: int,
               completion_tokens: int) -> float | None:
    """What these tokens cost on ``provider``'s ``model``: the configured per-million
    input/output prices, else genai-prices' table; None when neither prices the model
    (such a model is never sent: server/routing/decide.py)."""
    prompt_tokens, completion_tokens = max(prompt_tokens, 0), max(completion_tokens, 0)
    rates = prices.tokens_per_million.get(model)
    if rates is None:
        return _catalog_cost(provider, model, prompt_tokens, completion_tokens)
    per_in, per_out = rates
    return (prompt_tokens * per_in + completion_tokens * per_out) / 1_000_000


def unpriced_models(settings: Settings) -> list[str]:
    """The configured clouds' default chat models that have no price, as
    ``section.field 'model'``: a server with one would spill chats to it at $0, so it does
    not start (``spillway serve`` and ``spillway config check`` say which)."""
    found = []
    for name, cfg in (("openai", settings.openai), ("gemini", settings.gemini)):
        if cfg.configured and token_cost(settings.prices, name, cfg.vision_model, 1, 1) is None:
            found.append(f"{name}.vision_model {cfg.vision_model!r}")
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
