"""What every cloud provider speaks: jobs in, outcomes out, one error type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from PIL import Image

from pipelines.vlm import Message
from server.job import ImageJob

FailureKind = Literal["rate_limited", "server", "timeout", "malformed", "client", "auth"]


class ProviderError(Exception):
    """An upstream call that failed. ``kind`` drives the router: rate_limited honours
    ``retry_after_s``; server/timeout/malformed count against the circuit breaker; client
    and auth are the request's or the configuration's fault and do not trip it. The
    message never contains an API key."""

    def __init__(self, provider: str, kind: FailureKind, message: str, *,
                 status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.kind = kind
        self.status = status
        self.retry_after_s = retry_after_s

    @property
    def trips_breaker(self) -> bool:
        return self.kind in ("server", "timeout", "malformed")


@dataclass(frozen=True)
class OutImage:
    data: bytes  # encoded in the job's output_format, at the job's width x height
    media_type: str
    seed: int | None = None


@dataclass(frozen=True)
class ImageOutcome:
    images: list[OutImage]
    model: str  # the upstream model that answered
    cost_usd: float
    request_id: str | None = None


@dataclass(frozen=True)
class ChatJob:
    """A vision chat, after intake: messages in HF form (images as {"type": "image"}
    parts) and the decoded images in order."""

    model: str
    messages: list[Message]
    images: list[Image.Image] = field(default_factory=list, repr=False)
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class ChatOutcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    cost_usd: float
    request_id: str | None = None


class CloudProvider(Protocol):
    name: str  # "openai" or "gemini"

    async def generate_images(self, job: ImageJob, model: str) -> ImageOutcome: ...

    async def edit_images(self, job: ImageJob, model: str) -> ImageOutcome: ...

    async def chat(self, job: ChatJob, model: str) -> ChatOutcome: ...

    async def close(self) -> None: ...
