"""One path for every job: decide where it runs, run it there, fail over, account for it.

route handler -> ``Dispatcher.images`` / ``Dispatcher.chat`` -> ``router.decide`` ->
local batcher or cloud provider -> ``Served`` (route, cost, queue time) + a ledger row.
The decision is pure (server/routing/decide.py); what it reads of the upstreams (rate
windows, circuit breakers, today's spend, prices) is server/routing/clouds.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from pipelines.vlm import ChatItem
from server.catalog import Task, local_chat_model, local_ids, upstreams_serving
from server.config import Settings
from server.errors import APIError, bad_request, context_error
from server.job import ChatJob, ChatOutcome, ImageJob, OutImage, Served
from server.providers import pricing
from server.providers.base import ChatChunk, CloudProvider, ProviderError
from server.providers.local.batcher import Timing
from server.providers.local.chat import LocalChat, StreamEvent
from server.providers.local.estimate import Calibration
from server.providers.local.images import LocalImages, LocalRun
from server.providers.pricing import OPENAI_KINDS
from server.retry_after import retry_headers
from server.routing.clouds import BeforeSend as BeforeSend  # callers import it from here
from server.routing.clouds import Clouds, NotTried, Skip
from server.routing.decide import (
    JobView,
    Policy,
    Route,
    Signals,
    after_local_failure,
    decide,
)
from server.store.group_writer import GroupWriter
from server.store.ledger import Ledger, UsageRow

log = logging.getLogger(__name__)
T = TypeVar("T")
Tiers = frozenset[str] | None  # where bulk work may run ("local" and upstream tiers)


# A chat answer as it is written: pieces of its text, then the outcome and where it ran.
StreamItem = str | tuple[ChatOutcome, Served]


@dataclass(frozen=True)
class ChatStream:
    """A streamed chat answer (the local model's token by token, an upstream's as it
    comes) and the route it took."""

    events: AsyncIterator[StreamItem]
    route: str
    reason: str


class Dispatcher:
    def __init__(self, settings: Settings, providers: dict[str, CloudProvider],
                 ledger: Ledger | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.ledger = ledger
        self._writer = GroupWriter(ledger) if ledger is not None else None
        self.clouds = Clouds(settings, providers,
                             ledger.spent_today_by_route() if ledger else {}, clock)
        # For the live views (server/ops/live.py): each upstream, configured or not.
        self.providers, self.upstreams = self.clouds.providers, self.clouds.upstreams
        self.breakers = self.clouds.breakers
        self.images_local: LocalImages | None = None
        self.chat_local: LocalChat | None = None
        # Told of every ledger row (metrics); rows of batch-job items included.
        self.on_record: Callable[[UsageRow], None] | None = None
        # What local image runs took beyond the batcher's estimate, from the decision to
        # the result back on the event loop (the hops the batcher cannot see; large when
        # the HTTP side is loaded): a 95% bound on it is added to the estimate a deadline
        # is held to.
        # (Chat answers are not: their length, unknown ahead, dominates their time.)
        self._image_lag = Calibration(quantile=0.95)

    def cost_ceiling(self, job: ImageJob | ChatJob) -> float:
        """The most this job could cost on any configured upstream: what a key's USD
        quota reserves before it runs (local work costs far less)."""
        return self.clouds.cost_ceiling(job)

    # -- signals --------------------------------------------------------------------
    def _learn_lag(self, decided: float | None, run: LocalRun) -> None:
        """``decided``: when a job the router kept here was admitted. What the batcher
        took it learns itself; this is the rest, up to the result back on the loop."""
        if decided is not None:
            now = time.monotonic()
            self._image_lag.add(now - decided - run.done_s, now)

    def _signals(self, task: Task, asked: str | None, local: LocalImages | LocalChat | None,
                 items: list[object], bulk: bool = False, lag_s: float = 0.0,
                 skip: Skip = frozenset()) -> Signals:
        left = self.clouds.total_left()
        clouds = self.clouds.states(task, asked, skip)
        if local is None:
            return Signals(False, float("inf"), False, 5.0, clouds, left)
        batcher = local.batcher
        snap = batcher.snapshot()
        room = snap.queued + len(items) <= batcher.policy.max_queue
        return Signals(True, batcher.estimated_wait(items, bulk=bulk) + lag_s,  # type: ignore[arg-type]
                       room,
                       batcher.estimated_wait([]), clouds, left)

    def _policy(self, task: Task, bulk: bool = False, tiers: Tiers = None) -> Policy:
        """Bulk work goes to the cloud only by explicit model, unless it may spill
        (``RouterSettings.bulk_may_spill``) and take critical qualities there too."""
        r = self.settings.router
        cloud_ok = not bulk or r.bulk_may_spill(tiers)
        return Policy(spill=r.spill and cloud_ok,
                      critical_qualities=frozenset(r.critical_qualities if cloud_ok else ()),
                      preferred=self.settings.preferred(task),
                      local_ids=local_ids(task, self.settings.vlm.aliases))

    def _view(self, task: Task, asked: str | None, quality: str | None, deadline_s: float,
              costs: dict[str, float | None], bulk: bool, tiers: Tiers,
              skip: Skip = frozenset()) -> JobView:
        allowed = frozenset(tiers if tiers is not None else
                            self.settings.router.bulk_tiers) if bulk else None
        serving = tuple(n for n in upstreams_serving(list(self.clouds.upstreams.values()), task,
                                                     asked) if n not in skip)
        return JobView(task, asked, quality, deadline_s, costs, serving,
                       self.settings.router.overflow_tier, allowed)

    async def images(self, job: ImageJob, deadline_s: float, *, bulk: bool = False,
                     before_send: BeforeSend | None = None, tiers: Tiers = None
                     ) -> tuple[list[OutImage], Served]:
        local = self.images_local
        # Only OpenAI's edits take a mask: a masked edit goes to no other cloud.
        skip = frozenset(n for n, up in self.clouds.upstreams.items()
                         if job.mask is not None and up.kind not in OPENAI_KINDS)
        costs = {p: self.clouds.image_cost(p, job)
                 for p in self.clouds.takers("image", job.model, skip)}
        view = self._view("image", job.model, job.quality, deadline_s, costs, bulk, tiers,
                          skip)
        lag = 0.0 if bulk else max(0.0, self._image_lag.value(time.monotonic()))
        signals = self._signals("image", job.model, local, job.items(), bulk, lag,  # type: ignore[arg-type]
                                skip)
        policy = self._policy("image", bulk, tiers)
        route = decide(view, signals, policy)
        decided = time.monotonic() if route.where == "local" and not bulk else None
        equivalent = self.clouds.equivalent_image(job)

        async def on_cloud(name: str, reason: str) -> tuple[list[OutImage], Served]:
            return await self._images_on_cloud(name, job, reason, equivalent, before_send)

        answer, route = await self._on_clouds(route, local, on_cloud)
        if answer is not None:
            return answer
        assert local is not None
        try:
            # Held to the deadline it was admitted by, less the lag the batcher cannot see.
            run = await local.generate(job, bulk=bulk,
                                       due_in_s=None if bulk else deadline_s - lag)
            self._learn_lag(decided, run)
        except APIError as exc:
            fallback = self._clouds_after_local_failure(exc, view, signals, policy)
            if not fallback:
                raise
            return await self.clouds.in_turn(fallback, "local-failure", on_cloud)
        served = Served("local", route.reason, pricing.local_cost(self.settings.prices,
                                                                  run.device_s),
                        equivalent, run.queue_s * 1000, run.device_s)
        return run.images, served

    async def _images_on_cloud(self, provider: str, job: ImageJob, reason: str,
                               equivalent: float, before_send: BeforeSend | None = None
                               ) -> tuple[list[OutImage], Served]:
        model = self.clouds.model_for(provider, "image", job.model)
        assert model is not None
        cloud = self.clouds.providers[provider]
        call = cloud.edit_images if job.init_images else cloud.generate_images
        outcome = await self.clouds.send(provider, model, lambda: call(job, model), before_send)
        return outcome.images, Served(provider, reason, outcome.cost_usd, equivalent,
                                      upstream_model=outcome.model)

    # -- chat --------------------------------------------------------------------------
    def route_chat(self, job: ChatJob, deadline_s: float, bulk: bool = False,
                   tiers: Tiers = None) -> tuple[Route, JobView, Signals, Policy]:
        local = self.chat_local
        prompt = self.clouds.rough_prompt_tokens(job)
        # An alias (a cloud name the operator chose to answer locally) means local.
        asked = local_chat_model(job.model, self.settings.vlm.aliases)
        # Claude takes no seed: a seeded chat goes elsewhere (named: a 400 on seed).
        skip = frozenset(n for n, up in self.clouds.upstreams.items()
                         if job.seed is not None and up.kind == "anthropic")
        named = set(upstreams_serving(list(self.clouds.upstreams.values()), "vision", asked))
        if skip and named and named <= skip:
            raise bad_request(f"{asked} takes no seed; leave 'seed' out to use it.",
                              param="seed", code="unsupported_parameter")
        costs = {p: self.clouds.chat_cost(p, job, prompt, job.max_tokens)
                 for p in self.clouds.takers("vision", asked, skip)}
        view = self._view("vision", asked, None, deadline_s, costs, bulk, tiers, skip)
        signals = self._signals("vision", asked, local, [job], bulk, skip=skip)
        policy = self._policy("vision", bulk, tiers)
        return decide(view, signals, policy), view, signals, policy

    async def chat(self, job: ChatJob, deadline_s: float, *, bulk: bool = False,
                   before_send: BeforeSend | None = None, tiers: Tiers = None
                   ) -> tuple[ChatOutcome, Served]:
        route, view, signals, policy = self.route_chat(job, deadline_s, bulk, tiers)
        local = self.chat_local

        async def on_cloud(name: str, reason: str) -> tuple[ChatOutcome, Served]:
            return await self.chat_on_cloud(name, job, reason, before_send)

        answer, route = await self._on_clouds(route, local, on_cloud)
        if answer is not None:
            return answer
        assert local is not None
        await check_context(local, job)
        try:
            result, timing = await local.complete(job, bulk=bulk)
        except APIError as exc:
            fallback = self._clouds_after_local_failure(exc, view, signals, policy)
            if not fallback:
                raise
            return await self.clouds.in_turn(fallback, "local-failure", on_cloud)
        outcome = ChatOutcome.of(result, local.model_id)
        return outcome, self.local_chat_served(route.reason, job, outcome, timing)

    async def stream_chat(self, job: ChatJob, deadline_s: float, *, bulk: bool = False,
                          tiers: Tiers = None) -> ChatStream:
        """The answer as it is written, wherever it runs. Everything that can fail before
        the first piece (the route, an upstream that will not answer: the next one or
        local takes it) fails here; a failure after it is the stream's last event."""
        route, _, _, _ = self.route_chat(job, deadline_s, bulk, tiers)
        local = self.chat_local

        async def on_cloud(name: str, reason: str) -> ChatStream:
            return await self._cloud_stream(name, job, reason)

        answer, route = await self._on_clouds(route, local, on_cloud)
        if answer is not None:
            return answer
        assert local is not None
        await check_context(local, job)
        events = await local.stream(job, bulk=bulk)
        return ChatStream(self._local_events(events, route.reason, job, local.model_id),
                          "local", route.reason)

    async def _local_events(self, events: AsyncGenerator[StreamEvent, None], reason: str,
                            job: ChatJob, model_id: str) -> AsyncIterator[StreamItem]:
        async with aclosing(events):  # a client that leaves stops the row
            async for event in events:
                if event.result is None:
                    yield event.text
                    continue
                outcome = ChatOutcome.of(event.result, model_id)
                yield outcome, self.local_chat_served(reason, job, outcome, event.timing)

    async def _cloud_stream(self, name: str, job: ChatJob, reason: str) -> ChatStream:
        """An upstream's streamed answer, opened: its first piece is in hand (so a refusal
        or an upstream down fails over before anything is sent to the client)."""
        model = self.clouds.model_for(name, "vision", job.model)
        assert model is not None
        cloud = self.clouds.providers[name]
        chunks = self.clouds.stream(name, model, lambda: cloud.stream_chat(job, model))
        first = await anext(chunks)
        return ChatStream(self._cloud_events(first, chunks, name, reason, job), name, reason)

    async def _cloud_events(self, first: ChatChunk, chunks: AsyncGenerator[ChatChunk, None],
                            name: str, reason: str, job: ChatJob) -> AsyncIterator[StreamItem]:
        async with aclosing(chunks):
            chunk: ChatChunk | None = first
            while chunk is not None:
                if isinstance(chunk, str):
                    yield chunk
                else:
                    yield chunk, self._cloud_chat_served(name, reason, job, chunk)
                try:
                    chunk = await anext(chunks, None)
                except ProviderError as exc:  # after the headers: one error event
                    raise APIError(502, f"The upstream failed mid-answer: {exc}",
                                   type="server_error", code="upstream_error") from None

    def local_chat_served(self, reason: str, job: ChatJob, outcome: ChatOutcome,
                          timing: Timing | None) -> Served:
        device_s = timing.device_s if timing else 0.0
        queue_s = timing.queue_s if timing else 0.0
        equivalent = self.clouds.equivalent_chat(job, outcome.prompt_tokens,
                                                 outcome.completion_tokens)
        return Served("local", reason, pricing.local_cost(self.settings.prices, device_s),
                      equivalent,
                      queue_s * 1000, device_s, None, outcome.prompt_tokens,
                      outcome.completion_tokens)

    async def chat_on_cloud(self, provider: str, job: ChatJob, reason: str,
                            before_send: BeforeSend | None = None
                            ) -> tuple[ChatOutcome, Served]:
        model = self.clouds.model_for(provider, "vision", job.model)
        assert model is not None
        cloud = self.clouds.providers[provider]
        outcome = await self.clouds.send(provider, model, lambda: cloud.chat(job, model),
                                       before_send)
        return outcome, self._cloud_chat_served(provider, reason, job, outcome)

    def _cloud_chat_served(self, name: str, reason: str, job: ChatJob,
                           outcome: ChatOutcome) -> Served:
        """What an upstream's chat answer says about itself: where, why, its cost and
        tokens, and what the reference upstream would have charged."""
        equivalent = self.clouds.equivalent_chat(job, outcome.prompt_tokens,
                                                 outcome.completion_tokens)
        return Served(name, reason, outcome.cost_usd, equivalent,
                      upstream_model=outcome.model, prompt_tokens=outcome.prompt_tokens,
                      completion_tokens=outcome.completion_tokens)

    async def _on_clouds(self, route: Route, local: LocalImages | LocalChat | None,
                         attempt: Callable[[str, str], Awaitable[T]]) -> tuple[T | None, Route]:
        """A cloud route run (the next upstream serving a named model on failure): its
        answer; else None and where the job goes now (local, or a refusal raised here)."""
        if route.where in self.clouds.upstreams:
            try:
                return await self.clouds.in_turn((route.where, *route.then), route.reason,
                                                 attempt), route
            except (ProviderError, NotTried) as exc:
                route = self._after_cloud_failure(exc, local)
        if route.where == "reject":
            raise _reject(route)
        return None, route

    # -- failover ----------------------------------------------------------------------
    def _after_cloud_failure(self, exc: Exception, local: LocalImages | LocalChat | None
                             ) -> Route:
        """Every cloud route failed (or could not start): local takes it if it has room."""
        log.warning("cloud route failed, failing over: %s", exc)
        if local is not None:
            snap = local.batcher.snapshot()
            if snap.queued < local.batcher.policy.max_queue:
                return Route("local", "failover")
        retry = exc.retry_after_s if isinstance(exc, ProviderError) else None
        if isinstance(exc, ProviderError) and exc.kind == "rate_limited":
            return Route("reject", "failover", 429, "rate_limit_exceeded",
                         "The cloud provider is rate limited and the local queue is full."
                         if local is not None else "The cloud provider is rate limited.",
                         retry_after_s=retry or 1.0)
        here = "the local queue has no room" if local is not None else \
            "no local model takes this work"
        return Route("reject", "failover", 502, "upstream_error",
                     f"The cloud provider failed and {here}.", retry_after_s=retry or 1.0)

    def _clouds_after_local_failure(self, exc: APIError, view: JobView, signals: Signals,
                                    policy: Policy) -> list[str]:
        """A local pipeline failure (e.g. CUDA out of memory) may go to the cloud: the
        upstreams that could take it now, best first."""
        if exc.code != "pipeline_error" or not self.settings.router.local_failover:
            return []
        fresh = Signals(signals.local_loaded, signals.local_wait_s, signals.local_has_room,
                        signals.local_drain_s,
                        {n: s for n, s in self.clouds.states(view.task, view.model).items()
                         if n in signals.clouds},
                        signals.total_budget_left)
        return after_local_failure(view, fresh, policy)

    # -- accounting ----------------------------------------------------------------------
    async def record(self, row: UsageRow) -> None:
        if row.outcome == "ok" and row.route != "local":
            self.clouds.spend(row.route, row.cost_usd)
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
