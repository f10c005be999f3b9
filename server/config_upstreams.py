"""The cloud upstreams in the settings: a list (``upstreams``), each with its kind, place,
key, models, prices, rate limits, budget and tier; and the two sections of before
(``openai``, ``gemini``), which still work and become the upstreams ``openai`` and
``gemini`` (``legacy_upstreams``).

Pure models and functions, read when ``Settings`` is built, never at import.
"""

from __future__ import annotations

import os
from fnmatch import fnmatchcase
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    SecretStr,
    field_validator,
    model_validator,
)

UpstreamKind = Literal["openai", "azure", "openai-compatible", "gemini", "anthropic"]
Tier = Literal["economy", "standard", "premium"]
# Worst to best: a job "of at least" a tier may go to that tier or a later one.
TIERS: tuple[Tier, ...] = ("economy", "standard", "premium")
LOCAL = "local"  # the tier name of this box, for bulk work's list of allowed tiers
Place = Literal["local", "economy", "standard", "premium"]
PLACES: tuple[Place, ...] = ("local", "economy", "standard", "premium")
TIERS_METADATA = "spillway_tiers"  # a batch's metadata key: where its items may run


def parse_places(text: str) -> frozenset[str]:
    """``"local,economy"`` -> the places named; a ValueError names one that is not."""
    named = frozenset(p.strip().lower() for p in text.split(",") if p.strip())
    unknown = sorted(named - set(PLACES))
    if not named or unknown:
        raise ValueError(f"{TIERS_METADATA} takes a comma list of {', '.join(PLACES)}"
                         + (f", not {unknown[0]!r}" if unknown else ""))
    return named

# The names a client may ask for by model, per kind (shell-style patterns). The vendor's
# own API serves its whole family; a relay or an Azure resource usually mirrors OpenAI's
# names (say `models:` to narrow it).
OPENAI_FAMILY = ["gpt-*", "dall-e*", "chatgpt-*", "o1*", "o3*", "o4*"]
FAMILY: dict[str, list[str]] = {
    "openai": OPENAI_FAMILY, "azure": OPENAI_FAMILY, "openai-compatible": OPENAI_FAMILY,
    "gemini": ["gemini-*"], "anthropic": ["claude-*"],
}
# The models a routed (not named) job runs on, per kind; None: the kind does not do it.
DEFAULT_IMAGE_MODEL: dict[str, str | None] = {
    "openai": "gpt-image-1", "azure": "gpt-image-1", "openai-compatible": "gpt-image-1",
    "gemini": "gemini-2.5-flash-image", "anthropic": None,
}
DEFAULT_VISION_MODEL: dict[str, str] = {
    "openai": "gpt-4o-mini", "azure": "gpt-4o-mini", "openai-compatible": "gpt-4o-mini",
    "gemini": "gemini-2.5-flash", "anthropic": "claude-haiku-4-5",
}
_UNSET = "__kind_default__"  # image_model/vision_model not given: the kind's default


class RateLimit(BaseModel):
    per_minute: int = Field(ge=1)
    burst: int = Field(ge=1, description="at most this many in any burst_window_s")
    burst_window_s: float = Field(10.0, gt=0)


# model -> quality (low/medium/high) -> upstream size ("1024x1024") -> USD per image
ImageTable = dict[str, dict[str, NonNegativeFloat]]
TokenRates = tuple[NonNegativeFloat, NonNegativeFloat]  # USD per million, input and output


class UpstreamPrices(BaseModel):
    """This upstream's own prices, over the server-wide ``prices`` and genai-prices."""

    model_config = ConfigDict(extra="forbid")

    tokens_per_million: dict[str, TokenRates] = Field(
        default_factory=dict, description="model -> [input, output] USD per million tokens")
    images: dict[str, ImageTable] = Field(
        default_factory=dict, description="model -> quality -> size -> USD per image")
    image_each: dict[str, NonNegativeFloat] = Field(
        default_factory=dict, description="model -> USD per image whatever its size")
    factor: NonNegativeFloat = Field(
        1.0, description="what this upstream charges against the list prices (a relay "
        "at 60% of OpenAI's: 0.6); applies to prices not given in this section")


class UpstreamSettings(BaseModel):
    """One cloud upstream. Keys are referenced (``api_key_env``) or given (``api_key``);
    either way they are never printed."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,31}$",
                      description="what responses (x-spillway-route), the ledger and the "
                      "metrics call it")
    kind: UpstreamKind
    base_url: str | None = Field(None, description="openai, openai-compatible, gemini, "
                                 "anthropic: where it is (default: the vendor's own API)")
    azure_endpoint: str | None = None
    azure_api_version: str = "2025-04-01-preview"
    api_version: str | None = Field(None, description="gemini: the API version")
    organization: str | None = None
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(None, description="the environment variable that holds "
                                    "the key")
    image_model: str | None = Field(
        _UNSET, description="what a routed image job runs on here (null: no routed images)")
    vision_model: str | None = Field(
        _UNSET, description="what a routed vision chat runs on here (null: none)")
    models: list[str] | None = Field(
        None, description="names (shell patterns) a client may ask for by model; default: "
        "the kind's family (gpt-*, gemini-*, claude-*...)")
    upstream_models: dict[str, str] = Field(
        default_factory=dict, description="model -> the name this upstream knows it by "
        "(an Azure deployment, a relay's prefixed name)")
    prices: UpstreamPrices = UpstreamPrices()
    rate_limits: dict[str, RateLimit] = Field(
        default_factory=dict, description="model -> limit; models not named here: "
        "router.rate_limits")
    daily_budget_usd: NonNegativeFloat | None = None
    tier: Tier = "standard"
    overflow: bool = Field(True, description="may take work the local queue would be late with")
    timeout_s: float = Field(120.0, gt=0)

    @field_validator("api_key_env")
    @classmethod
    def _key_variable_is_set(cls, v: str | None) -> str | None:
        if v is not None and not os.environ.get(v):
            raise ValueError(f"the environment variable {v} is not set")
        return v

    @model_validator(mode="after")
    def _complete(self) -> UpstreamSettings:
        if self.image_model == _UNSET:
            self.image_model = DEFAULT_IMAGE_MODEL[self.kind]
        if self.vision_model == _UNSET:
            self.vision_model = DEFAULT_VISION_MODEL[self.kind]
        if self.kind == "anthropic" and self.image_model is not None:
            raise ValueError("image_model: Claude does not make images; leave it out")
        if self.kind == "azure" and not self.azure_endpoint:
            raise ValueError("azure_endpoint: an azure upstream needs its endpoint")
        if self.kind == "openai-compatible" and not self.base_url:
            raise ValueError("base_url: an openai-compatible upstream needs its base_url")
        if self.api_key_env is not None:
            if self.api_key is not None:
                raise ValueError("api_key, api_key_env: give one of them, not both")
            self.api_key = SecretStr(os.environ[self.api_key_env])
        if self.api_key is None or not self.api_key.get_secret_value():
            raise ValueError("api_key_env: no key (give api_key_env, or api_key)")
        return self

    # -- what it serves

    def default_model(self, task: str) -> str | None:
        return self.image_model if task == "image" else self.vision_model

    def does(self, task: str) -> bool:
        """Can it do this kind of job at all? (Claude makes no images.)"""
        return not (task == "image" and self.kind == "anthropic")

    def serves(self, task: str, model: str) -> bool:
        """Does a client asking for ``model`` by name get it here?"""
        if not self.does(task):
            return False
        if model in (self.image_model, self.vision_model) or model in self.upstream_models:
            return True
        patterns = self.models if self.models is not None else FAMILY[self.kind]
        return any(fnmatchcase(model.lower(), p.lower()) for p in patterns)

    def named_models(self) -> list[str]:
        """Every model named exactly (not as a pattern): each must have a price."""
        exact = [m for m in (self.models or []) if not any(c in m for c in "*?[")]
        named = [self.image_model, self.vision_model, *exact, *self.upstream_models]
        return list(dict.fromkeys(m for m in named if m))

    def wire_name(self, model: str) -> str:
        return self.upstream_models.get(model, model)


Upstreams = Annotated[list[UpstreamSettings], Field(default_factory=list)]


def default_limits() -> dict[str, RateLimit]:
    # Published tier-1 limits (requests per minute); the burst keeps a minute's worth
    # from leaving in one second.
    return {
        "gpt-image-1": RateLimit(per_minute=5, burst=3),
        "gpt-image-1-mini": RateLimit(per_minute=5, burst=3),
        "gpt-4o-mini": RateLimit(per_minute=500, burst=100),
        "gpt-4o": RateLimit(per_minute=500, burst=100),
        "gemini-2.5-flash-image": RateLimit(per_minute=10, burst=5),
        "gemini-2.5-flash": RateLimit(per_minute=1000, burst=200),
    }


class Prices(BaseModel):
    """USD, server-wide: what an upstream's own ``prices`` do not say. Image prices per
    model, quality and size (OpenAI's published tables); tokens per million (models not
    named here: genai-prices' table)."""

    openai_image: ImageTable = Field(default_factory=lambda: {
        "low": {"1024x1024": 0.011, "1024x1536": 0.016, "1536x1024": 0.016},
        "medium": {"1024x1024": 0.042, "1024x1536": 0.063, "1536x1024": 0.063},
        "high": {"1024x1024": 0.167, "1024x1536": 0.25, "1536x1024": 0.25},
    }, description="gpt-image-1 per image: quality -> size -> USD")
    # Other OpenAI image models, model -> the same kind of table. A model in neither has no
    # price and is never sent. DALL-E has one quality (standard; DALL-E 3 also hd): the
    # tiers low and medium are its standard, high its hd.
    openai_image_models: dict[str, ImageTable] = Field(default_factory=lambda: {
        "gpt-image-1-mini": {
            "low": {"1024x1024": 0.005, "1024x1536": 0.006, "1536x1024": 0.006},
            "medium": {"1024x1024": 0.011, "1024x1536": 0.015, "1536x1024": 0.015},
            "high": {"1024x1024": 0.036, "1024x1536": 0.052, "1536x1024": 0.052},
        },
        "dall-e-3": {
            "low": {"1024x1024": 0.04, "1024x1792": 0.08, "1792x1024": 0.08},
            "medium": {"1024x1024": 0.04, "1024x1792": 0.08, "1792x1024": 0.08},
            "high": {"1024x1024": 0.08, "1024x1792": 0.12, "1792x1024": 0.12},
        },
        "dall-e-2": {q: {"256x256": 0.016, "512x512": 0.018, "1024x1024": 0.02}
                     for q in ("low", "medium", "high")},
    })
    # What gpt-image models bill when the answer reports its usage (it does): USD per
    # million text-input, image-input and output tokens. The ledger then uses the reported
    # tokens; the table above is the estimate the router decides by.
    image_tokens_per_million: dict[str, tuple[NonNegativeFloat, NonNegativeFloat,
                                              NonNegativeFloat]] = Field(
        default_factory=lambda: {"gpt-image-1": (5.0, 10.0, 40.0),
                                 "gpt-image-1-mini": (2.0, 2.5, 8.0)})
    gemini_image: NonNegativeFloat = Field(
        0.039, description="USD per image of a Gemini image model not in gemini_image_models")
    gemini_image_models: dict[str, NonNegativeFloat] = Field(
        default_factory=lambda: {"gemini-2.5-flash-image": 0.039,
                                 "gemini-3-pro-image-preview": 0.134})
    # model -> (input, output) USD per million tokens
    tokens_per_million: dict[str, TokenRates] = Field(default_factory=lambda: {
        "gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00),
        "gemini-2.5-flash": (0.30, 2.50),
    })
    local_gpu_per_hour: float = Field(2.0, ge=0, description="what an hour of the box costs")


class _Keyed(BaseModel):
    """A section that is configured when it holds a key."""

    api_key: SecretStr | None = None

    @property
    def configured(self) -> bool:
        return self.api_key is not None and bool(self.api_key.get_secret_value())


class OpenAISettings(_Keyed):
    """OpenAI, an OpenAI-compatible relay (base_url), or Azure OpenAI (azure_endpoint)."""

    base_url: str | None = None
    azure_endpoint: str | None = None
    azure_api_version: str = "2025-04-01-preview"
    # Azure names deployments, not models: model name -> deployment name
    azure_deployments: dict[str, str] = Field(default_factory=dict)
    organization: str | None = None
    image_model: str = "gpt-image-1"
    vision_model: str = "gpt-4o-mini"
    timeout_s: float = Field(120.0, gt=0)


class GeminiSettings(_Keyed):
    base_url: str | None = None
    api_version: str | None = None
    image_model: str = "gemini-2.5-flash-image"
    vision_model: str = "gemini-2.5-flash"
    timeout_s: float = Field(120.0, gt=0)


def legacy_upstreams(openai: OpenAISettings, gemini: GeminiSettings) -> list[UpstreamSettings]:
    """The ``openai`` and ``gemini`` sections as the upstreams ``openai`` and ``gemini``
    (the two-cloud configuration of before the list), each serving its whole family."""
    found = []
    if openai.configured:
        kind: UpstreamKind = ("azure" if openai.azure_endpoint else
                              "openai-compatible" if openai.base_url else "openai")
        found.append(UpstreamSettings(
            name="openai", kind=kind, base_url=openai.base_url,
            azure_endpoint=openai.azure_endpoint, azure_api_version=openai.azure_api_version,
            organization=openai.organization, api_key=openai.api_key,
            image_model=openai.image_model, vision_model=openai.vision_model,
            models=OPENAI_FAMILY, upstream_models=openai.azure_deployments,
            timeout_s=openai.timeout_s))
    if gemini.configured:
        found.append(UpstreamSettings(
            name="gemini", kind="gemini", base_url=gemini.base_url,
            api_version=gemini.api_version, api_key=gemini.api_key,
            image_model=gemini.image_model, vision_model=gemini.vision_model,
            timeout_s=gemini.timeout_s))
    return found


def as_upstream(cfg: UpstreamSettings | OpenAISettings | GeminiSettings) -> UpstreamSettings:
    """An upstream's settings, whether given as one or as the openai or gemini section."""
    if isinstance(cfg, UpstreamSettings):
        return cfg
    found = (legacy_upstreams(cfg, GeminiSettings()) if isinstance(cfg, OpenAISettings)
             else legacy_upstreams(OpenAISettings(), cfg))
    if not found:
        raise ValueError("this upstream is not configured: no api_key")
    return found[0]


def section_upstream(openai: OpenAISettings, gemini: GeminiSettings,
                     name: str) -> UpstreamSettings:
    """The upstream the ``openai`` or ``gemini`` section describes, keyed or not, named
    ``name`` (``gemini``: Gemini's section; any other: OpenAI's). For what is priced or
    served without a configured key: a provider handed in by a test, a cost comparison."""
    key = SecretStr("unused")
    if name == "gemini":
        up = legacy_upstreams(OpenAISettings(), gemini.model_copy(update={"api_key": key}))[0]
    else:
        up = legacy_upstreams(openai.model_copy(update={"api_key": key}), GeminiSettings())[0]
    return up.model_copy(update={"name": name})


def reference_upstream(clouds: list[UpstreamSettings], preferred: str | None,
                       task: str) -> UpstreamSettings | None:
    """The upstream local work is compared with (what it would have cost in the cloud):
    the preferred one, else the first listed that does this work."""
    for up in clouds:
        if up.name == preferred:
            return up
    return next((up for up in clouds if up.does(task) and up.default_model(task)), None)
