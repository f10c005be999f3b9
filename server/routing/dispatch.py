"""One path for every job: decide where it runs, run it there, fail over, account for it.

route handler -> ``Dispatcher.images`` / ``Dispatcher.chat`` -> ``router.decide`` ->
local batcher or cloud provider -> ``Served`` (route, cost, queue time) + a ledger row.
The decision is pure (server/routing/decide.py); this module holds the state it reads: rate
windows, circuit breakers, today's spend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from pipelines.vlm import ChatItem
from server.catalog import CLOUDS, Task, cloud_of, local_chat_model, local_ids
from server.config import Settings
from server.errors import APIError, context_error
from server.job import ChatJob, ChatOutcome, ImageJob, OutImage, Served
from server.providers import pricing
from server.providers.base import CloudProvider, ProviderError
from server.providers.local.batcher import Timing
from server.providers.local.chat import LocalChat, StreamEvent
from server.providers.local.estimate import Calibration
from server.providers.local.images import LocalImages, LocalRun
from server.providers.pricing import nearest_size
from server.retry_after import retry_headers
from server.routing.decide import CloudState, JobView, Policy, Route, Signals, decide
from server.routing.limits import CircuitBreaker, RateLimiter
from server.store.group_writer import GroupWriter
from server.store.ledger import Ledger, UsageRow

log = logging.getLogger(__name__)
T = TypeVar("T")
BeforeSend = Callable[[str, str], Awaitable[None]]  # (provider, upstream model)


@dataclass(frozen=True)
class LocalStream:
    """A chat answer streamed token by token from the local model, and why it runs here."""

    events: AsyncIterator[StreamEvent]
    reason: str


class _Skip(Exception):
    """A cloud route that could not even be tried (slot taken since the decision)."""


class Dispatcher:
    def __init__(self, settings: Settings, providers: dict[str, CloudProvider],
                 ledger: Ledger | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.providers = providers
        self.ledger = ledger
        self._writer = GroupWriter(ledger) if ledger is not None else None
        r = settings.router
        self.limiter = RateLimiter(r.rate_limits, clock)
        self.breakers = {name: CircuitBreaker(r.breaker_failures, r.breaker_cooldown_s, clock)
                         for name in CLOUDS}
        self.images_local: LocalImages | None = None
        self.chat_local: LocalChat | None = None
        # Told of every ledger row (metrics); rows of batch-job items included.
        self.on_record: Callable[[UsageRow], None] | None = None
        # Today's spend per route, read from the ledger at start (budgets survive restarts)
        # and kept current by record(): no query on the request path.
        self._day = datetime.now(UTC).date()
        self._spent: dict[str, float] = ledger.spent_today_by_route() if ledger else {}
        # What local image runs took beyond the batcher's estimate, from the decision to
        # the result back on the event loop (the hops the batcher cannot see; large when
        # the HTTP side is loaded): a 95% bound on it is added to the estimate a deadline
        # is held to.
        # (Chat answers are not: their length, unknown ahead, dominates their time.)
        self._image_lag = Calibration(quantile=0.95)

    # -- signals --------------------------------------------------------------------
    def _spent_today(self) -> dict[str, float]:
        today = datetime.now(UTC).date()
        if today != self._day:
            self._day, self._spent = today, {}
        return self._spent

    def _upstream_model(self, provider: str, task: Task, asked: str | None) -> str:
        if asked and cloud_of(asked) == provider:
            return asked
        cfg = self.settings.openai if provider == "openai" else self.settings.gemini
        return cfg.image_model if task == "image" else cfg.vision_model

    def _configured(self, provider: str) -> bool:
        return provider in self.providers

    def _cloud_states(self, task: Task, asked: str | None) -> dict[str, CloudState]:
        spent = self._spent_today()
        budgets = self.settings.router.daily_budget_usd
        return {name: CloudState(
                    configured=self._configured(name),
                    circuit_ok=self.breakers[name].available(),
                    rate_wait_s=self.limiter.wait_s(self._upstream_model(name, task, asked)),
                    spent_today=spent.get(name, 0.0),
                    budget=budgets.get(name))
                for name in CLOUDS}

    def _learn_lag(self, decided: float | None, run: LocalRun) -> None:
        """``decided``: when a job the router kept here was admitted. What the batcher
        took it learns itself; this is the rest, up to the result back on the loop."""
        if decided is not None:
            now = time.monotonic()
            self._image_lag.add(now - decided - run.done_s, now)

    def _signals(self, task: Task, asked: str | None, local: LocalImages | LocalChat | None,
                 items: list[object], bulk: bool = False, lag_s: float = 0.0) -> Signals:
        total = self.settings.router.daily_budget_usd.get("total")
        spent = sum(v for k, v in self._spent_today().items() if k != "local")
        clouds = self._cloud_states(task, asked)
        if local is None:
            return Signals(False, float("inf"), False, 5.0, clouds,
                           None if total is None else total - spent)
        batcher = local.batcher
        snap = batcher.snapshot()
        room = snap.queued + len(items) <= batcher.policy.max_queue
        return Signals(True, batcher.estimated_wait(items, bulk=bulk) + lag_s,  # type: ignore[arg-type]
                       room,
                       batcher.estimated_wait([]), clouds,
                       None if total is None else total - spent)

    def _policy(self, task: Task, bulk: bool = False) -> Policy:
        """Bulk (batch-job) work goes to the cloud only by explicit model, unless
        ``router.bulk_spill`` says it may spill and take critical qualities there too."""
        r = self.settings.router
        cloud_ok = not bulk or r.bulk_spill
        return Policy(spill=r.spill and cloud_ok,
                      critical_qualities=frozenset(r.critical_qualities if cloud_ok else ()),
                      preferred=r.image_provider if task == "image" else r.vision_provider,
                      local_ids=local_ids(task, self.settings.vlm.aliases))

    # -- costs ------------------------------------------------------------------------
    def _image_cost(self, provider: str, job: ImageJob) -> float:
        prices = self.settings.prices
        if provider == "gemini":
            return pricing.gemini_image_cost(prices, job.n)
        return pricing.openai_image_cost(prices, job.quality,
                                         nearest_size(job.width, job.height), job.n,
                                         self._upstream_model(provider, "image", job.model))

    def _chat_cost(self, provider: str, job: ChatJob, prompt: int, completion: int
                   ) -> float | None:
        """None: the upstream model has no price, so the job never goes there."""
        model = self._upstream_model(provider, "vision", job.model)
        return pricing.token_cost(self.settings.prices, provider, model, prompt, completion)

    def cost_ceiling(self, job: ImageJob | ChatJob) -> float:
        """The most this job could cost on any configured upstream: what a key's USD
        quota reserves before it runs (local work costs far less)."""
        if isinstance(job, ImageJob):
            costs = [self._image_cost(p, job) for p in self.providers]
        else:
            prompt = self._rough_prompt_tokens(job)
            costs = [c for p in self.providers
                     if (c := self._chat_cost(p, job, prompt, job.max_tokens)) is not None]
        return max(costs, default=0.0)

    @staticmethod
    def _rough_prompt_tokens(job: ChatJob) -> int:
        chars = sum(len(p.get("text", "")) for m in job.messages for p in m["content"])
        return chars // 4 + 800 * len(job.images)

    # -- cloud calls --------------------------------------------------------------------
    async def _on_cloud(self, provider: str, model: str, call: Callable[[], Awaitable[T]],
                        before_send: BeforeSend | None = None) -> T:
        breaker = self.breakers[provider]
        if not breaker.try_acquire():
            raise _Skip(f"{provider} circuit open")
        if not self.limiter.try_acquire(model):
            breaker.release()
            raise _Skip(f"{model} rate limit")
        if before_send is not None:
            # Durable batch items write down that they are about to go upstream, so a
            # restart never sends one twice. One that may not go frees its circuit slot.
            try:
                await before_send(provider, model)
            except BaseException:
                breaker.release()
                raise
        try:
            result = await call()
        except ProviderError as exc:
            if exc.kind == "rate_limited":
                self.limiter.upstream_limited(model, exc.retry_after_s)
                breaker.release()
            elif exc.trips_breaker:
                breaker.record_failure()
            else:
                breaker.release()
            raise
        breaker.record_success()
        return result

    # -- images ------------------------------------------------------------------------
    async def images(self, job: ImageJob, deadline_s: float, *, bulk: bool = False,
                     before_send: BeforeSend | None = None) -> tuple[list[OutImage], Served]:
        local = self.images_local
        costs = {p: self._image_cost(p, job) for p in CLOUDS}
        view = JobView("image", job.model, job.quality, deadline_s, costs)
        lag = 0.0 if bulk else max(0.0, self._image_lag.value(time.monotonic()))
        signals = self._signals("image", job.model, local, job.items(), bulk, lag)  # type: ignore[arg-type]
        route = decide(view, signals, self._policy("image", bulk))
        decided = time.monotonic() if route.where == "local" and not bulk else None
        default_cloud = self.settings.router.image_provider
        equivalent = costs.get(default_cloud, 0.0)
        if route.where in CLOUDS:
            try:
                return await self._images_on_cloud(route.where, job, route.reason, equivalent,
                                                   before_send)
            except (ProviderError, _Skip) as exc:
                route = self._after_cloud_failure(exc, local)
        if route.where == "reject":
            raise _reject(route)
        assert local is not None
        try:
            # Held to the deadline it was admitted by, less the lag the batcher cannot see.
            run = await local.generate(job, bulk=bulk,
                                       due_in_s=None if bulk else deadline_s - lag)
            self._learn_lag(decided, run)
        except APIError as exc:
            fallback = self._cloud_after_local_failure(exc, view, "image", job.model)
            if fallback is None:
                raise
            return await self._images_on_cloud(fallback, job, "local-failure", equivalent,
                                               before_send)
        served = Served("local", route.reason, pricing.local_cost(self.settings.prices,
                                                                  run.device_s),
                        equivalent, run.queue_s * 1000, run.device_s)
        return run.images, served

    async def _images_on_cloud(self, provider: str, job: ImageJob, reason: str,
                               equivalent: float, before_send: BeforeSend | None = None
                               ) -> tuple[list[OutImage], Served]:
        model = self._upstream_model(provider, "image", job.model)
        cloud = self.providers[provider]
        call = cloud.edit_images if job.init_images else cloud.generate_images
        outcome = await self._on_cloud(provider, model, lambda: call(job, model), before_send)
        return outcome.images, Served(provider, reason, outcome.cost_usd, equivalent,
                                      upstream_model=outcome.model)

    # -- chat --------------------------------------------------------------------------
    def route_chat(self, job: ChatJob, deadline_s: float, bulk: bool = False
                   ) -> tuple[Route, JobView]:
        local = self.chat_local
        prompt = self._rough_prompt_tokens(job)
        costs = {p: self._chat_cost(p, job, prompt, job.max_tokens) for p in CLOUDS}
        # An alias (a cloud name the operator chose to answer locally) means local.
        asked = local_chat_model(job.model, self.settings.vlm.aliases)
        view = JobView("vision", asked, None, deadline_s, costs)
        return decide(view, self._signals("vision", asked, local, [job], bulk),
                      self._policy("vision", bulk)), view

    async def chat(self, job: ChatJob, deadline_s: float, *, bulk: bool = False,
                   before_send: BeforeSend | None = None) -> tuple[ChatOutcome, Served]:
        route, view = self.route_chat(job, deadline_s, bulk)
        local = self.chat_local
        if route.where in CLOUDS:
            try:
                return await self.chat_on_cloud(route.where, job, route.reason, before_send)
            except (ProviderError, _Skip) as exc:
                route = self._after_cloud_failure(exc, local)
        if route.where == "reject":
            raise _reject(route)
        assert local is not None
        await check_context(local, job)
        try:
            result, timing = await local.complete(job, bulk=bulk)
        except APIError as exc:
            fallback = self._cloud_after_local_failure(exc, view, "vision", job.model)
            if fallback is None:
                raise
            return await self.chat_on_cloud(fallback, job, "local-failure", before_send)
        outcome = ChatOutcome.of(result, local.model_id)
        return outcome, self.local_chat_served(route.reason, job, outcome, timing)

    async def stream_chat(self, job: ChatJob, deadline_s: float, *, bulk: bool = False
                          ) -> LocalStream | tuple[ChatOutcome, Served]:
        """Token by token when the job stays local; else the whole answer (a cloud's, or
        local after a cloud failed), as ``chat`` gives it."""
        local = self.chat_local
        if local is not None:
            route, _ = self.route_chat(job, deadline_s, bulk)
            if route.where == "local":
                await check_context(local, job)
                return LocalStream(await local.stream(job, bulk=bulk), route.reason)
        return await self.chat(job, deadline_s, bulk=bulk)

    def local_chat_served(self, reason: str, job: ChatJob, outcome: ChatOutcome,
                          timing: Timing | None) -> Served:
        device_s = timing.device_s if timing else 0.0
        queue_s = timing.queue_s if timing else 0.0
        default_cloud = self.settings.router.vision_provider
        return Served("local", reason, pricing.local_cost(self.settings.prices, device_s),
                      self._chat_cost(default_cloud, job, outcome.prompt_tokens,
                                      outcome.completion_tokens) or 0.0,
                      queue_s * 1000, device_s, None, outcome.prompt_tokens,
                      outcome.completion_tokens)

    async def chat_on_cloud(self, provider: str, job: ChatJob, reason: str,
                            before_send: BeforeSend | None = None
                            ) -> tuple[ChatOutcome, Served]:
        model = self._upstream_model(provider, "vision", job.model)
        cloud = self.providers[provider]
        outcome = await self._on_cloud(provider, model, lambda: cloud.chat(job, model),
                                       before_send)
        default_cloud = self.settings.router.vision_provider
        equivalent = self._chat_cost(default_cloud, job, outcome.prompt_tokens,
                                     outcome.completion_tokens) or 0.0
        return outcome, Served(provider, reason, outcome.cost_usd, equivalent,
                               upstream_model=outcome.model,
                               prompt_tokens=outcome.prompt_tokens,
                               completion_tokens=outcome.completion_tokens)

    # -- failover ----------------------------------------------------------------------
    def _after_cloud_failure(self, exc: Exception, local: LocalImages | LocalChat | None
                             ) -> Route:
        """A cloud route failed (or could not start): local takes it if it has room."""
        log.warning("cloud route failed, failing over: %s", exc)
        if local is not None:
            snap = local.batcher.snapshot()
            if snap.queued < local.batcher.policy.max_queue:
                return Route("local", "failover")
        retry = exc.retry_after_s if isinstance(exc, ProviderError) else None
        if isinstance(exc, ProviderError) and exc.kind == "rate_limited":
            return Route("reject", "failover", 429, "rate_limit_exceeded",
                         "The cloud provider is rate limited and the local queue is full.",
                         retry_after_s=retry or 1.0)
        return Route("reject", "failover", 502, "upstream_error",
                     "The cloud provider failed and the local queue has no room.",
                     retry_after_s=retry or 1.0)

    def _cloud_after_local_failure(self, exc: APIError, view: JobView, task: Task,
                                   asked: str | None) -> str | None:
        """A local pipeline failure (e.g. CUDA out of memory) may go to the cloud."""
        if exc.code != "pipeline_error" or not self.settings.router.local_failover:
            return None
        clouds = self._cloud_states(task, asked)
        policy = self._policy(task)
        for name in (policy.preferred, *(c for c in CLOUDS if c != policy.preferred)):
            cost = view.cost_estimate.get(name, 0.0)
            if cost is not None and clouds[name].usable(cost, None):
                return name
        return None

    # -- accounting ----------------------------------------------------------------------
    async def record(self, row: UsageRow) -> None:
        if row.outcome == "ok" and row.route != "local":
            spent = self._spent_today()
            spent[row.route] = spent.get(row.route, 0.0) + row.cost_usd
        if self.on_record is not None:
            self.on_record(row)
        if self._writer is not None:
            # Never raises for a database that refuses: the row is held and written later.
            # Rows go in groups, one transaction for all that came during the last one.
            await self._writer.write(row)

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()
        if self._writer is not None:
            await asyncio.to_thread(self._writer.flush)


async def check_context(local: LocalChat, item: ChatItem) -> None:
    """The prompt plus the completion must fit the local model's context."""
    prompt = await asyncio.to_thread(local.count_tokens, item)
    if prompt + item.max_tokens > local.context_length:
        raise context_error(prompt, item.max_tokens, local.context_length)


def _reject(route: Route) -> APIError:
    # The router's wait (a drain estimate, an upstream's Retry-After) as clients honour it.
    headers = retry_headers(route.retry_after_s) if route.retry_after_s is not None else {}
    kind = {429: "rate_limit_error", 400: "invalid_request_error"}.get(route.status,
                                                                        "server_error")
    return APIError(route.status, route.message, type=kind, code=route.code,
                    param="model" if route.code == "provider_not_configured" else None,
                    headers=headers)
