"""What every cloud provider speaks: jobs in, outcomes out (server/job.py), one error type."""

from __future__ import annotations

from collections.abc import AsyncIterator
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


# What a streamed cloud answer yields: pieces of its text, then the whole outcome.
ChatChunk = str | ChatOutcome


class CloudProvider(Protocol):
    name: str  # the upstream's

    async def generate_images(self, job: ImageJob, model: str) -> ImageOutcome: ...

    async def edit_images(self, job: ImageJob, model: str) -> ImageOutcome: ...

    async def chat(self, job: ChatJob, model: str) -> ChatOutcome: ...

    def stream_chat(self, job: ChatJob, model: str) -> AsyncIterator[ChatChunk]: ...

    async def close(self) -> None: ...


async def whole(answer: ChatOutcome) -> AsyncIterator[ChatChunk]:
    """An answer that came whole, as a stream: its text in one piece, then itself."""
    yield answer.text
    yield answer
