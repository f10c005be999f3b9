"""All settings, from ``SPILLWAY_*`` environment variables (nested with ``__``).

Nothing here is read at import time: the CLI builds one ``Settings`` when it starts (its
options override the environment) and hands it down; tests pass their own to
``create_app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    Field,
    NonNegativeFloat,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.config_upstreams import (
    PLACES,
    GeminiSettings,
    OpenAISettings,
    Place,
    Prices,
    RateLimit,
    Tier,
    Upstreams,
    UpstreamSettings,
    default_limits,
    legacy_upstreams,
    reference_upstream,
    section_upstream,
)

__all__ = ["GeminiSettings", "OpenAISettings", "Prices", "RateLimit", "Tier",
           "UpstreamSettings"]


class BatchSettings(BaseModel):
    max_batch: int = Field(32, ge=1, description="most items in one pipeline call")
    max_batch_pixels: int = Field(
        16 * 512 * 512, ge=64 * 64,
        description="pixel budget per batch: more small images than large")
    max_wait_ms: float = Field(10.0, ge=0, description="how long the first item waits for company")
    # at least one full request (n <= 10), or some requests could never be admitted
    max_queue: int = Field(256, ge=10, description="items waiting, beyond which requests get 429")
    default_timeout_s: float = Field(120.0, gt=0, description="an item not started by then expires")
    warmup: bool = Field(True, description="before /readyz turns 200 the image model runs a "
                         "batch of 1 and one of 4 at the default size, so the first deadline "
                         "estimates are measured, not guessed")


class EngineSettings(BaseModel):
    devices: str = Field(
        "auto", description="where the image model runs: `auto` (one worker process per "
        "CUDA device but the one `vlm_devices=auto` takes; on a machine without CUDA, one "
        "CPU worker process), `inprocess` (the pipeline in the server's process, on "
        "SPILLWAY_DEVICE), or a comma list of worker processes, e.g. `cuda:0,cuda:1` or "
        "`cpu,cpu`")
    vlm_devices: str = Field(
        "auto", description="where the vision-language model runs: `auto` (with two or "
        "more CUDA devices, one worker process on the last one, which the image model then "
        "leaves to it; with one CUDA device or none, one worker process beside the image "
        "model's; in the server's process when `devices` is `inprocess`), `inprocess` (in "
        "the server's process, on SPILLWAY_DEVICE), or a comma list of worker processes, "
        "e.g. `cuda:1` or `cpu`")
    load_timeout_s: float = Field(600.0, gt=0, description="a worker not loaded by then "
                                  "is reported and left out")
    batch_timeout_s: float = Field(600.0, gt=0, description="a worker that neither answers "
                                   "a batch nor dies by then (hung) is stopped and restarted; "
                                   "its batch runs elsewhere")
    restart_backoff_s: float = Field(1.0, gt=0, description="a worker whose start failed "
                                     "is tried again after this, then twice as long each "
                                     "time, at most a minute")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="the image model's weights and activations: `auto` is bf16 on "
        "a CUDA device that has it (the VAE then decodes with no fp32 upcast), fp16 on "
        "older GPUs, fp32 on the CPU. fp16 decodes with the fp16-fix VAE when it is present "
        "(`spillway weights fetch sdxl-turbo` fetches it), else upcasts each decode to fp32")
    compile: bool = Field(
        False, description="torch.compile the UNet and the VAE decoders for the shapes in "
        "`warm_buckets`, at start-up (before /readyz turns 200); other shapes run eagerly "
        "and nothing is ever compiled on the request path")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs",
                          "max-autotune"] = Field(
        "default", description="torch.compile's mode (README: which one was measured)")
    compile_backend: str = Field("inductor", description="torch.compile's backend")
    compile_timeout_s: float = Field(
        300.0, gt=0, description="with `compile`, a worker's load may take this much longer "
        "per bucket and decoder (compiling the full UNet takes minutes per shape)")
    warm_buckets: list[str] = Field(
        default_factory=lambda: ["512x512@1", "512x512@4", "512x512@8", "512x512@16"],
        description="WIDTHxHEIGHT@BATCH shapes compiled and warmed at start-up; a batch of "
        "another size runs as chunks of these sizes, padded")

    @field_validator("warm_buckets")
    @classmethod
    def _buckets(cls, v: list[str]) -> list[str]:
        from pipelines.buckets import parse_buckets

        parse_buckets(v)  # a ValueError names the bad one
        return v

    def load_deadline_s(self, decoders: int) -> float:
        """How long an image worker may take to load: compiling and warming each bucket
        with each decoder comes on top of loading the weights."""
        if not self.compile:
            return self.load_timeout_s
        return self.load_timeout_s + self.compile_timeout_s * len(self.warm_buckets) * decoders

    def worker_devices(self, cuda_count: int, vlm: bool = True) -> list[str]:
        """The image model's worker processes ([] = the pipeline in this process); ``vlm``:
        the VLM is served too (with ``vlm_devices=auto`` it may take a GPU)."""
        return self.plan(cuda_count, vlm)[0]

    def vlm_worker_devices(self, cuda_count: int) -> list[str]:
        """The VLM's worker processes ([] = the model in this process)."""
        return self.plan(cuda_count)[1]

    def plan(self, cuda_count: int, vlm: bool = True) -> tuple[list[str], list[str]]:
        """(image worker devices, VLM worker devices); [] is the server's process."""
        images, chat = self.devices.strip().lower(), self.vlm_devices.strip().lower()
        cudas = [f"cuda:{i}" for i in range(cuda_count)]
        named_images = _device_list("devices", images, cuda_count)
        named_chat = _device_list("vlm_devices", chat, cuda_count)
        # The VLM's auto: its own GPU when one is free of the image model, else beside it.
        if not vlm or chat == "inprocess" or (chat == "auto" and images == "inprocess"):
            chat_devices: list[str] = []
        elif named_chat is not None:
            chat_devices = named_chat
        elif named_images is not None:
            free = [d for d in cudas if d not in {_canonical(x) for x in named_images}]
            chat_devices = [free[-1]] if free else [named_images[-1]]
        else:
            chat_devices = [cudas[-1]] if cudas else ["cpu"]
        if images == "inprocess":
            return [], chat_devices
        if named_images is not None:
            return named_images, chat_devices
        # Measured (README): one CPU worker process serves as fast as the pipeline in the
        # server's process, and leaves the HTTP side a third of the CPU per image.
        left = [d for d in cudas if d not in {_canonical(x) for x in chat_devices}]
        return left or cudas or ["cpu"], chat_devices


def _canonical(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


def _device_list(field: str, spec: str, cuda_count: int) -> list[str] | None:
    """A comma list of devices, checked against this machine; None for auto/inprocess."""
    if spec in ("auto", "inprocess"):
        return None
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise ValueError(f"engine.{field}: {spec!r} names no device")
    for d in devices:
        if d != "cpu" and not (d == "cuda" or (d.startswith("cuda:") and d[5:].isdecimal())):
            raise ValueError(f"engine.{field}: {d!r} is not cpu, cuda or cuda:N")
        index = int(d[5:]) if d.startswith("cuda:") else 0
        if d.startswith("cuda") and index >= cuda_count:
            raise ValueError(f"engine.{field}: {d!r}, but this machine has "
                             f"{cuda_count} CUDA devices")
    return devices


class ImageSettings(BaseModel):
    min_side: int = Field(256, ge=8)
    max_side: int = Field(1024, ge=8)
    default_size: str = "512x512"
    default_steps: int = Field(1, ge=1, le=4)
    default_strength: float = Field(0.5, gt=0, le=1, description="images/edits")
    variation_strength: float = Field(
        0.5, ge=0.25, le=1, description="images/variations: how far a variation moves from "
        "its source (image-to-image with an empty prompt)")
    url_ttl_s: int = Field(3600, ge=1, description="how long `url` responses stay fetchable")
    url_store_mb: int = Field(512, ge=1, description="memory for `url` images; oldest go first")
    fast_qualities: list[str] = Field(
        default_factory=list, description="qualities decoded with the tiny VAE (TAESDXL) "
        "when it is installed, e.g. [\"low\"]; a request may also ask with `vae`")

    @model_validator(mode="after")
    def _bounds(self) -> ImageSettings:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} is above max_side {self.max_side}")
        return self


class MediaSettings(BaseModel):
    """Image intake limits, shared by every endpoint that accepts images."""

    max_bytes: int = Field(20 * 2**20, ge=1024, description="largest image, encoded")
    max_pixels: int = Field(40_000_000, ge=1, description="largest image, decoded (w*h)")
    fetch_timeout_s: float = Field(10.0, gt=0, description="whole fetch, redirects included")
    max_redirects: int = Field(3, ge=0)
    max_images_per_request: int = Field(8, ge=1)
    # Eight images at max_pixels, in each of a few requests at once, are gigabytes:
    # intake holds at most this many decoded pixels (4-8 bytes each while decoding) and an
    # image waits its turn (server/media/budget.py).
    max_decoding_pixels: int = Field(
        120_000_000, ge=1, description="decoded pixels held at once, all requests together")
    decode_wait_s: float = Field(
        10.0, gt=0, description="how long an image waits for room to be decoded; then 429")
    allow_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs that image URLs may reach although private/loopback, e.g. 10.0.0.0/8")


class VlmSettings(BaseModel):
    """The local vision-language model behind /v1/chat/completions."""

    enabled: bool = True
    # Cloud model names the local model answers instead of their provider, e.g.
    # ["gpt-4o-mini"]: client code keeps its model name and never leaves the box.
    aliases: list[str] = Field(default_factory=list)
    default_max_tokens: int = Field(512, ge=1)
    max_tokens_cap: int = Field(4096, ge=1, description="largest max_tokens accepted")
    max_batch: int = Field(16, ge=1)
    max_wait_ms: float = Field(10.0, ge=0)
    max_queue: int = Field(128, ge=1)
    timeout_s: float = Field(300.0, gt=0)
    # image_url.detail -> most pixels per image handed to the processor
    detail_pixels: dict[str, int] = Field(default_factory=lambda: {
        "low": 448 * 448, "auto": 1024 * 1024, "high": 1792 * 1792})


class RouterSettings(BaseModel):
    spill: bool = Field(True, description="overflow goes to the cloud when a deadline would slip")
    critical_qualities: list[str] = Field(
        default_factory=lambda: ["high", "hd"],
        description="qualities that go to the best tier usable, not to this box")
    image_provider: str | None = Field(
        None, description="an upstream that goes first for images whenever it is usable; "
        "none: the cheapest usable (with only the openai/gemini sections: openai)")
    vision_provider: str | None = Field(
        None, description="the same for vision chat")
    overflow_tier: Tier = Field(
        "economy", description="work the local queue would be late with goes to the "
        "cheapest usable upstream of this tier or better")
    default_deadline_ms: float = Field(30_000, gt=0)
    bulk_spill: bool = Field(False, description="may batch-job work spill to the cloud")
    bulk_tiers: list[Place] = Field(
        default_factory=lambda: list(PLACES),
        description="where bulk work (batch jobs, bulk-priority keys) may run; naming it "
        "lets bulk work spill to these tiers as bulk_spill does to all. A batch's metadata "
        "`spillway_tiers` says it per batch, e.g. \"local,economy\"")
    local_failover: bool = Field(True, description="a local failure may retry on the cloud")

    def bulk_may_spill(self, tiers: frozenset[str] | None) -> bool:
        """May bulk work go to the cloud unasked (overflow, critical quality)? With
        bulk_spill, or where the tiers it may use were named (here, or by its batch)."""
        return self.bulk_spill or tiers is not None or "bulk_tiers" in self.model_fields_set
    gemini_names: Literal["route", "explicit"] = Field(
        "route", description="on the Gemini-compatible API, gemini-* model names mean a job "
        "of that kind for the router (local first) or, with 'explicit', Gemini itself")
    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown_s: float = Field(30.0, gt=0)
    rate_limits: dict[str, RateLimit] = Field(
        default_factory=default_limits, description="model -> limit, for every upstream "
        "that does not set its own")
    daily_budget_usd: dict[str, NonNegativeFloat] = Field(
        default_factory=lambda: {"openai": 20.0, "gemini": 20.0, "total": 30.0},
        description="upstream name -> USD per UTC day (an upstream's own daily_budget_usd "
        "wins), and `total` for all of them together")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPILLWAY_", env_nested_delimiter="__",
                                      extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    weights_dir: Path = Path("weights")
    sdxl_weights: Path | None = Field(
        None, description="serve this folder instead of the best found")
    device: str = "auto"
    xformers: bool = False
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads when running on the CPU; default: all cores "
        "but one (left to the HTTP side), shared out among the CPU engine workers")
    max_body_mb: float = Field(25.0, gt=0)
    # A client must not hold a connection (or its memory) with a request that never ends:
    # server/http/server.py bounds the head, server/http/middleware.py the body.
    max_header_kb: int = Field(64, ge=1, description="request line and headers; more: 431")
    header_timeout_s: float = Field(
        20.0, gt=0, description="time for the request line and headers to arrive; then 408")
    body_timeout_s: float = Field(
        20.0, gt=0, description="a request body that stalls this long gets a 408, and so "
        "does one slower than body_min_bytes_per_s after its first body_timeout_s")
    body_min_bytes_per_s: float = Field(
        1024.0, gt=0, description="slowest average upload rate accepted (bytes per second)")
    public_url: str | None = Field(
        None, description="base for `url` responses; default: the request's")
    log_level: str = "info"
    access_log: Literal["json", "text", "off"] = Field(
        "json", description="`spillway serve`: one line per request on stdout, as a JSON "
        "object (json), key=value pairs (text), or none (off)")
    batch: BatchSettings = BatchSettings()
    engine: EngineSettings = EngineSettings()
    images: ImageSettings = ImageSettings()
    media: MediaSettings = MediaSettings()
    vlm: VlmSettings = VlmSettings()
    upstreams: Upstreams
    openai: OpenAISettings = OpenAISettings()
    gemini: GeminiSettings = GeminiSettings()
    router: RouterSettings = RouterSettings()
    prices: Prices = Prices()
    ledger_url: str = Field("sqlite:///data/ledger.db", description="any SQLAlchemy URL")
    admin_key: SecretStr | None = Field(
        None, description="always accepted; sees every key's usage")
    shutdown_grace_s: float = Field(30.0, ge=0, description="SIGTERM: time to finish requests")
    storage_min_free_mb: int = Field(
        64, ge=0, description="/readyz reports storage trouble below this much free space "
        "where batch files and the SQLite ledger live")

    _clouds: list[UpstreamSettings] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _one_list_of_upstreams(self) -> Settings:
        legacy = legacy_upstreams(self.openai, self.gemini)
        if self.upstreams and legacy:
            raise ValueError(
                f"upstreams: the {' and '.join(u.name for u in legacy)} section also has a "
                "key; with an upstreams list, put every cloud in the list")
        clouds = self.upstreams or legacy
        seen: set[str] = set()
        for i, up in enumerate(clouds):
            if up.name in seen or up.name in ("local", "total"):
                raise ValueError(f"upstreams.{i}.name: {up.name!r} is "
                                 + ("used twice" if up.name in seen else "reserved"))
            seen.add(up.name)
        self._clouds = clouds
        return self

    @property
    def clouds(self) -> list[UpstreamSettings]:
        """The cloud upstreams, in the order given: the ``upstreams`` list, or the
        ``openai`` and ``gemini`` sections as the upstreams of those names."""
        return self._clouds

    def preferred(self, task: str) -> str | None:
        """The upstream that goes first for this task whenever it is usable."""
        named = self.router.image_provider if task == "image" else self.router.vision_provider
        if named is None and not self.upstreams:
            return "openai"  # the two-cloud configuration: OpenAI first, as it always was
        return named

    def reference(self, task: str, clouds: list[UpstreamSettings] | None = None
                  ) -> UpstreamSettings:
        """The upstream whose price local work is compared with (what it would have cost
        in the cloud): the preferred one, else the first listed that does this work, else
        the openai section's (the preferred section's), configured or not."""
        preferred = self.preferred(task)
        found = reference_upstream(self.clouds if clouds is None else clouds, preferred, task)
        return found or section_upstream(self.openai, self.gemini, preferred or "openai")

    def budget(self, upstream: UpstreamSettings) -> float | None:
        """An upstream's own daily budget, else ``router.daily_budget_usd[name]``."""
        if upstream.daily_budget_usd is not None:
            return upstream.daily_budget_usd
        return self.router.daily_budget_usd.get(upstream.name)
