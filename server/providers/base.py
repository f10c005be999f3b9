"""What every cloud provider speaks: jobs in, outcomes out (server/job.py), one error type."""

from __future__ import annotations

from typing import Literal, Protocol

from server.job import ChatJob, ChatOutcome, ImageJob, ImageOutcome

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


class CloudProvider(Protocol):
    name: str  # "openai" or "gemini"

    async def generate_images(self, job: ImageJob, model: str) -> ImageOutcome: ...

    async def edit_images(self, job: ImageJob, model: str) -> ImageOutcome: ...

    async def chat(self, job: ChatJob, model: str) -> ChatOutcome: ...

    async def close(self) -> None: ...
