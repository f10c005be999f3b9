"""Where a job runs: ``decide(job, signals, policy)``, a pure function.

Explicit model wins; a quality the policy calls critical goes to the preferred cloud;
otherwise the job spills when the local wait would miss its deadline, waits locally while
the queue has room, and is refused with 429 (Retry-After = drain time) when it has none.
A cloud provider is *usable* when it is configured, its circuit lets a request through,
its rate limit has a slot now, its budget covers the job and the job's model there has a
price (an unpriced model is never sent: asked for by name, it is a 400).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from server.catalog import AUTO, Task
from server.catalog import CLOUDS as CLOUDS  # re-exported: callers import them from here
from server.catalog import cloud_of as cloud_of


@dataclass(frozen=True)
class JobView:
    task: Task
    model: str | None  # as the client sent it
    quality: str | None
    deadline_s: float
    # provider -> USD this job would cost there; None: the model it would run there has no
    # price, and an unpriced call is never sent
    cost_estimate: Mapping[str, float | None]


# Floating-point slack when comparing money against a limit: 0.1 + 0.2 spent of a 0.3
# budget is "exactly at the limit", not over it.
MONEY_EPS = 1e-9


@dataclass(frozen=True)
class CloudState:
    configured: bool
    circuit_ok: bool
    rate_wait_s: float  # 0 = a slot is free now
    spent_today: float
    budget: float | None  # None: no cap for this provider

    def usable(self, cost: float, total_left: float | None) -> bool:
        """Configured, circuit closed (or half-open), a rate slot now, and ``cost`` more
        within its own daily budget and what is left of the total one."""
        within = self.budget is None or self.spent_today + cost <= self.budget + MONEY_EPS
        within_total = total_left is None or cost <= total_left + MONEY_EPS
        return (self.configured and self.circuit_ok and self.rate_wait_s <= 0
                and within and within_total)


@dataclass(frozen=True)
class Signals:
    local_loaded: bool
    local_wait_s: float  # estimated time until the job would be done locally
    local_has_room: bool
    local_drain_s: float
    clouds: dict[str, CloudState]
    total_budget_left: float | None = None


@dataclass(frozen=True)
class Policy:
    spill: bool
    critical_qualities: frozenset[str]
    preferred: str  # cloud provider for this task
    local_ids: frozenset[str]  # names that mean "run locally"


@dataclass(frozen=True)
class Route:
    where: Literal["local", "openai", "gemini", "reject"]
    reason: str  # explicit | quality | deadline | local | failover | ...
    status: int = 200  # for reject
    code: str | None = None
    message: str = ""
    retry_after_s: float | None = None


def _usable(job: JobView, signals: Signals, provider: str) -> bool:
    state = signals.clouds.get(provider)
    cost = job.cost_estimate.get(provider, 0.0)
    return state is not None and cost is not None and state.usable(cost,
                                                                   signals.total_budget_left)


def _clouds_in_order(job: JobView, signals: Signals, policy: Policy) -> list[str]:
    order = [policy.preferred, *(c for c in CLOUDS if c != policy.preferred)]
    return [c for c in order if _usable(job, signals, c)]


def _local_or_refuse(signals: Signals, reason: str) -> Route:
    if not signals.local_loaded:
        return Route("reject", reason, 503, "model_not_ready",
                     "The local model is still loading and no cloud provider can take "
                     "this request.", retry_after_s=5)
    if signals.local_has_room:
        return Route("local", reason)
    return Route("reject", reason, 429, "queue_full",
                 "The local queue is full and no cloud provider can take this request.",
                 retry_after_s=max(1.0, signals.local_drain_s))


def _explicit_cloud(job: JobView, signals: Signals, provider: str) -> Route:
    state = signals.clouds.get(provider)
    if state is None or not state.configured:
        return Route("reject", "explicit", 400, "provider_not_configured",
                     f"The model {job.model!r} runs on {provider}, which is not configured "
                     "on this server.")
    if provider in job.cost_estimate and job.cost_estimate[provider] is None:
        return Route("reject", "explicit", 400, "model_not_priced",
                     f"The model {job.model!r} has no price on this server, so it is never "
                     "sent upstream; an operator can price it with "
                     "SPILLWAY_PRICES__TOKENS_PER_MILLION.")
    if _usable(job, signals, provider):
        return Route(provider, "explicit")  # type: ignore[arg-type]
    # Configured but unhealthy, rate limited or over budget: the local model answers.
    if signals.local_loaded and signals.local_has_room:
        return Route("local", "failover")
    if state.rate_wait_s > 0:
        return Route("reject", "explicit", 429, "rate_limit_exceeded",
                     f"{provider} is at its rate limit.", retry_after_s=state.rate_wait_s)
    return Route("reject", "explicit", 503, "provider_unavailable",
                 f"{provider} cannot take requests right now and the local queue is full.",
                 retry_after_s=max(1.0, signals.local_drain_s))


def decide(job: JobView, signals: Signals, policy: Policy) -> Route:
    # 1. Explicit model wins.
    provider = cloud_of(job.model)
    if provider is not None:
        return _explicit_cloud(job, signals, provider)
    if job.model and job.model in policy.local_ids and job.model != AUTO:
        return _local_or_refuse(signals, "explicit")
    # 2. Quality the policy calls critical: the preferred cloud (any usable one).
    if job.quality and job.quality in policy.critical_qualities:
        clouds = _clouds_in_order(job, signals, policy)
        if clouds:
            return Route(clouds[0], "quality")  # type: ignore[arg-type]
        return _local_or_refuse(signals, "quality-fallback")
    # 3. Overflow: spill when waiting here would miss the deadline.
    late = not signals.local_loaded or signals.local_wait_s > job.deadline_s
    if late and policy.spill:
        clouds = _clouds_in_order(job, signals, policy)
        if clouds:
            return Route(clouds[0], "deadline")  # type: ignore[arg-type]
    # 4. Wait locally while there is room; else 429 with the drain time.
    return _local_or_refuse(signals, "local")
