"""The cloud upstreams as the router sees them: their settings and providers, each one's
rate windows and circuit, today's spend per upstream, what a job would cost on each, and
the call itself (a slot taken, the circuit told how it went). ``Dispatcher`` decides with
what this says (server/routing/dispatch.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from server.catalog import CLOUDS, Task
from server.config import Settings, UpstreamSettings
from server.config_upstreams import section_upstream
from server.job import ChatJob, ImageJob
from server.providers import pricing
from server.providers.base import ChatChunk, CloudProvider, ProviderError
from server.routing.decide import CloudState
from server.routing.limits import CircuitBreaker, RateLimiter

log = logging.getLogger(__name__)
T = TypeVar("T")
BeforeSend = Callable[[str, str], Awaitable[None]]  # (provider, upstream model)
Skip = frozenset[str]  # upstreams that cannot do what a job asks


def _model_on(up: UpstreamSettings, task: Task, asked: str | None) -> str | None:
    if asked and up.serves(task, asked):
        return asked
    return up.default_model(task)


class NotTried(Exception):
    """A cloud route that could not even be tried (slot taken since the decision)."""


class Clouds:
    def __init__(self, settings: Settings, providers: dict[str, CloudProvider],
                 spent_today: dict[str, float], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.settings = settings
        self.providers = providers
        r = settings.router
        # Every upstream the settings name, in their order. Without an upstreams list the
        # openai and gemini sections are the upstreams of those names, configured (with a
        # key) or not; a provider handed in without settings (tests) is one of them.
        self.upstreams = {u.name: u for u in settings.clouds}
        for name in [*(() if settings.upstreams else CLOUDS), *providers]:
            if name not in self.upstreams:
                self.upstreams[name] = section_upstream(settings.openai, settings.gemini,
                                                        name)
        # Each upstream has its own rate windows (its own limits over router.rate_limits)
        # and its own circuit.
        self.limiters = {name: RateLimiter({**r.rate_limits, **up.rate_limits}, clock)
                         for name, up in self.upstreams.items()}
        self.breakers = {name: CircuitBreaker(r.breaker_failures, r.breaker_cooldown_s, clock)
                         for name in self.upstreams}
        # Today's spend per route, read from the ledger at start (budgets survive restarts)
        # and kept current by spend(): no query on the request path.
        self._day = datetime.now(UTC).date()
        self._spent = spent_today

    def spent_today(self) -> dict[str, float]:
        today = datetime.now(UTC).date()
        if today != self._day:
            self._day, self._spent = today, {}
        return self._spent

    def spend(self, route: str, cost_usd: float) -> None:
        spent = self.spent_today()
        spent[route] = spent.get(route, 0.0) + cost_usd

    def total_left(self) -> float | None:
        """What is left of the total daily budget across upstreams (None: no cap)."""
        total = self.settings.router.daily_budget_usd.get("total")
        spent = sum(v for k, v in self.spent_today().items() if k != "local")
        return None if total is None else total - spent

    def model_for(self, name: str, task: Task, asked: str | None) -> str | None:
        """The model a job runs on there: the one asked for if it serves it, else its
        default for the task (None: it takes no routed work of this kind)."""
        return _model_on(self.upstreams[name], task, asked)

    def takers(self, task: Task, asked: str | None, skip: Skip = frozenset()) -> list[str]:
        """The upstreams that could run this job: they do this kind of work, have a model
        for it, and are not ``skip``ped (they cannot do what the job asks)."""
        return [name for name, up in self.upstreams.items()
                if up.does(task) and name not in skip
                and self.model_for(name, task, asked) is not None]

    def states(self, task: Task, asked: str | None, skip: Skip = frozenset()
               ) -> dict[str, CloudState]:
        spent = self.spent_today()
        states = {}
        for name in self.takers(task, asked, skip):
            up = self.upstreams[name]
            model = self.model_for(name, task, asked)
            assert model is not None
            states[name] = CloudState(
                configured=name in self.providers,
                circuit_ok=self.breakers[name].available(),
                rate_wait_s=self.limiters[name].wait_s(model),
                spent_today=spent.get(name, 0.0),
                budget=self.settings.budget(up), tier=up.tier, overflow=up.overflow)
        return states

    def reference(self, task: Task) -> UpstreamSettings:
        """The upstream whose price a local job is compared with (``cloud_equivalent``)."""
        return self.settings.reference(task, list(self.upstreams.values()))

    # -- costs ------------------------------------------------------------------------
    def image_cost(self, name: str, job: ImageJob) -> float | None:
        """None: the model it would run there has no price, so it never goes there."""
        return self._image_cost_on(self.upstreams[name], job)

    def chat_cost(self, name: str, job: ChatJob, prompt: int, completion: int
                  ) -> float | None:
        """None: the upstream model has no price, so the job never goes there."""
        return self._chat_cost_on(self.upstreams[name], job, prompt, completion)

    def equivalent_image(self, job: ImageJob) -> float:
        """What this image job would cost on the reference upstream."""
        return self._image_cost_on(self.reference("image"), job) or 0.0

    def equivalent_chat(self, job: ChatJob, prompt: int, completion: int) -> float:
        return self._chat_cost_on(self.reference("vision"), job, prompt, completion) or 0.0

    def _image_cost_on(self, up: UpstreamSettings, job: ImageJob) -> float | None:
        model = _model_on(up, "image", job.model)
        if model is None:
            return None
        return pricing.image_cost(self.settings.prices, up, model, job.quality, job.width,
                                  job.height, job.n)

    def _chat_cost_on(self, up: UpstreamSettings, job: ChatJob, prompt: int,
                      completion: int) -> float | None:
        model = _model_on(up, "vision", job.model)
        if model is None:
            return None
        return pricing.chat_cost(self.settings.prices, up, model, prompt, completion)

    def cost_ceiling(self, job: ImageJob | ChatJob) -> float:
        """The most this job could cost on any configured upstream: what a key's USD
        quota reserves before it runs (local work costs far less)."""
        if isinstance(job, ImageJob):
            costs = [self.image_cost(p, job) for p in self.providers]
        else:
            prompt = self.rough_prompt_tokens(job)
            costs = [self.chat_cost(p, job, prompt, job.max_tokens) for p in self.providers]
        return max((c for c in costs if c is not None), default=0.0)

    @staticmethod
    def rough_prompt_tokens(job: ChatJob) -> int:
        chars = sum(len(p.get("text", "")) for m in job.messages for p in m["content"])
        return chars // 4 + 800 * len(job.images)

    # -- cloud calls --------------------------------------------------------------------
    def _claim(self, provider: str, model: str) -> None:
        """A slot of the upstream's circuit and of its rate window, or ``NotTried``."""
        if not self.breakers[provider].try_acquire():
            raise NotTried(f"{provider} circuit open")
        if not self.limiters[provider].try_acquire(model):
            self.breakers[provider].release()
            raise NotTried(f"{provider} {model} rate limit")

    def _failed(self, provider: str, model: str, exc: ProviderError) -> None:
        """What a failure tells the upstream's circuit and rate window."""
        breaker = self.breakers[provider]
        if exc.kind == "rate_limited":
            self.limiters[provider].upstream_limited(model, exc.retry_after_s)
            breaker.release()
        elif exc.trips_breaker:
            breaker.record_failure()
        else:
            breaker.release()

    async def send(self, provider: str, model: str, call: Callable[[], Awaitable[T]],
                   before_send: BeforeSend | None = None) -> T:
        """Make the call if the upstream's circuit and rate window let it go now (else
        ``NotTried``); tell them how it went."""
        self._claim(provider, model)
        if before_send is not None:
            # Durable batch items write down that they are about to go upstream, so a
            # restart never sends one twice. One that may not go frees its circuit slot.
            try:
                await before_send(provider, model)
            except BaseException:
                self.breakers[provider].release()
                raise
        try:
            result = await call()
        except ProviderError as exc:
            self._failed(provider, model, exc)
            raise
        self.breakers[provider].record_success()
        return result

    async def stream(self, provider: str, model: str,
                     chunks: Callable[[], AsyncIterator[ChatChunk]]
                     ) -> AsyncGenerator[ChatChunk, None]:
        """``send`` for a streamed answer: the slots are taken at the first chunk asked
        for; the circuit hears of a success when the answer ends, of a failure when it
        fails, and of nothing when the client leaves first."""
        self._claim(provider, model)
        verdict = False
        try:
            async for chunk in chunks():
                yield chunk
            verdict = True
            self.breakers[provider].record_success()
        except ProviderError as exc:
            verdict = True
            self._failed(provider, model, exc)
            raise
        finally:
            if not verdict:
                self.breakers[provider].release()

    async def in_turn(self, names: Sequence[str], reason: str,
                      attempt: Callable[[str, str], Awaitable[T]]) -> T:
        """Each upstream in turn until one answers (the first with ``reason``, the rest as
        failover); the last failure if none does."""
        failure: ProviderError | NotTried | None = None
        for i, name in enumerate(names):
            try:
                return await attempt(name, reason if i == 0 else "failover")
            except (ProviderError, NotTried) as exc:
                if i + 1 < len(names):
                    log.warning("upstream %s failed, trying %s: %s", name, names[i + 1], exc)
                failure = exc
        assert failure is not None
        raise failure
