"""Where a job runs: ``decide(job, signals, policy)``, a pure function over any number of
cloud upstreams.

1. An explicit model goes to the upstreams that serve it, cheapest usable first (a local
   name stays local).
2. A quality the policy calls critical goes to the best tier that has a usable upstream,
   cheapest within it.
3. Overflow: when the local wait would miss the deadline, the cheapest usable upstream of
   at least the job's tier that takes overflow.
4. Otherwise the job waits locally while the queue has room, and is refused with 429
   (Retry-After = drain time) when it has none.

An explicit route names the next upstreams to try, in order, if the first fails. An
upstream is
*usable* when it is configured, its circuit lets a request through, its rate limit has a
slot now, its budget and the total one cover the job, the job's model there has a price
(an unpriced model is never sent: asked for by name, it is a 400) and the job may run on
its tier. The policy's preferred upstream, when it names one, goes first among those.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from server.catalog import AUTO, Task
from server.catalog import cloud_of as cloud_of  # re-exported: callers import it from here
from server.config_upstreams import LOCAL, TIERS


@dataclass(frozen=True)
class JobView:
    task: Task
    model: str | None  # as the client sent it
    quality: str | None
    deadline_s: float
    # upstream -> USD this job would cost there; None: the model it would run there has no
    # price, and an unpriced call is never sent
    cost_estimate: Mapping[str, float | None]
    # The upstreams that serve ``model`` by name, if the caller looked them up; None: the
    # upstream named after the model's family (``cloud_of``), if there is one.
    serving: tuple[str, ...] | None = None
    min_tier: str = TIERS[0]  # overflow goes to upstreams of this tier or better
    tiers: frozenset[str] | None = None  # where it may run at all ("local" too); None: anywhere

    def allows(self, tier: str) -> bool:
        return self.tiers is None or tier in self.tiers


# Floating-point slack when comparing money against a limit: 0.1 + 0.2 spent of a 0.3
# budget is "exactly at the limit", not over it.
MONEY_EPS = 1e-9


@dataclass(frozen=True)
class CloudState:
    configured: bool
    circuit_ok: bool
    rate_wait_s: float  # 0 = a slot is free now
    spent_today: float
    budget: float | None  # None: no cap for this upstream
    tier: str = "standard"
    overflow: bool = True  # may take work the local queue would be late with

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
    clouds: dict[str, CloudState]  # the upstreams that can do this kind of job, in order
    total_budget_left: float | None = None


@dataclass(frozen=True)
class Policy:
    spill: bool
    critical_qualities: frozenset[str]
    preferred: str | None  # an upstream that goes first whenever it is usable
    local_ids: frozenset[str]  # names that mean "run locally"


@dataclass(frozen=True)
class Route:
    where: str  # "local", "reject", or an upstream's name
    reason: str  # explicit | quality | deadline | local | failover | ...
    status: int = 200  # for reject
    code: str | None = None
    message: str = ""
    retry_after_s: float | None = None
    then: tuple[str, ...] = ()  # upstreams to try next, in order, if ``where`` fails


def _usable(job: JobView, signals: Signals, name: str) -> bool:
    state = signals.clouds.get(name)
    cost = job.cost_estimate.get(name, 0.0)
    return (state is not None and cost is not None and job.allows(state.tier)
            and state.usable(cost, signals.total_budget_left))


def ordered(job: JobView, signals: Signals, policy: Policy, names: list[str] | None = None,
            *, best_tier_first: bool = False) -> list[str]:
    """The usable ones of ``names`` (default: every upstream), best first: the best tier
    (when asked), then the preferred upstream, then the cheapest, then as configured."""
    position = {name: i for i, name in enumerate(signals.clouds)}
    usable = [n for n in (names if names is not None else list(signals.clouds))
              if _usable(job, signals, n)]

    def key(name: str) -> tuple[int, bool, float, int]:
        rank = TIERS.index(signals.clouds[name].tier) if best_tier_first else 0
        return (-rank, name != policy.preferred, job.cost_estimate.get(name) or 0.0,
                position[name])

    return sorted(usable, key=key)


def _local_or_refuse(job: JobView, signals: Signals, reason: str) -> Route:
    if not job.allows(LOCAL):
        return Route("reject", reason, 503, "no_upstream_available",
                     "This work may not run on this box and no upstream of the tiers it "
                     f"allows ({', '.join(sorted(job.tiers or ()))}) can take it now.",
                     retry_after_s=max(1.0, signals.local_drain_s))
    if not signals.local_loaded:
        return Route("reject", reason, 503, "model_not_ready",
                     "The local model is still loading and no cloud provider can take "
                     "this request.", retry_after_s=5)
    if signals.local_has_room:
        return Route("local", reason)
    return Route("reject", reason, 429, "queue_full",
                 "The local queue is full and no cloud provider can take this request.",
                 retry_after_s=max(1.0, signals.local_drain_s))


def _to(names: list[str], reason: str) -> Route:
    """To the first; a model named explicitly goes to the next that serves it if the
    first fails. Other work that fails upstream comes back here (``failover``): the
    failure counts against that upstream's circuit, and later work moves on."""
    return Route(names[0], reason, then=tuple(names[1:]) if reason == "explicit" else ())


def _serving(job: JobView, signals: Signals) -> tuple[str, ...]:
    if job.serving is not None:
        return job.serving
    family = cloud_of(job.model)
    return (family,) if family is not None and family in signals.clouds else ()


def _explicit_cloud(job: JobView, signals: Signals, policy: Policy) -> Route:
    serving = [n for n in _serving(job, signals)
               if n in signals.clouds and signals.clouds[n].configured]
    if not serving:
        where = cloud_of(job.model)
        return Route("reject", "explicit", 400, "provider_not_configured",
                     f"The model {job.model!r} runs on "
                     f"{where if where else 'an upstream'}, which is not configured "
                     "on this server.")
    priced = [n for n in serving if job.cost_estimate.get(n, 0.0) is not None]
    if not priced:
        return Route("reject", "explicit", 400, "model_not_priced",
                     f"The model {job.model!r} has no price on this server, so it is never "
                     "sent upstream; an operator can price it with "
                     "SPILLWAY_PRICES__TOKENS_PER_MILLION or the upstream's prices.")
    allowed = [n for n in priced if job.allows(signals.clouds[n].tier)]
    if not allowed:
        return Route("reject", "explicit", 400, "tier_not_allowed",
                     f"The model {job.model!r} is served only by upstreams of tiers this "
                     f"work may not use ({', '.join(sorted(job.tiers or ()))} allowed).")
    usable = ordered(job, signals, policy, allowed)
    if usable:
        return _to(usable, "explicit")
    # Configured but unhealthy, rate limited or over budget: the local model answers.
    if signals.local_loaded and signals.local_has_room and job.allows(LOCAL):
        return Route("local", "failover")
    waits = [signals.clouds[n].rate_wait_s for n in allowed]
    if all(w > 0 for w in waits):
        names = " and ".join(allowed)
        return Route("reject", "explicit", 429, "rate_limit_exceeded",
                     f"{names} {'is' if len(allowed) == 1 else 'are'} at its rate limit.",
                     retry_after_s=min(waits))
    return Route("reject", "explicit", 503, "provider_unavailable",
                 f"{' and '.join(allowed)} cannot take requests right now and the local "
                 "queue is full.", retry_after_s=max(1.0, signals.local_drain_s))


def is_cloud_name(job: JobView, signals: Signals) -> bool:
    return bool(_serving(job, signals)) or cloud_of(job.model) is not None


def decide(job: JobView, signals: Signals, policy: Policy) -> Route:
    # 1. Explicit model wins.
    if job.model and job.model in policy.local_ids and job.model != AUTO:
        return _local_or_refuse(job, signals, "explicit")
    if is_cloud_name(job, signals):
        return _explicit_cloud(job, signals, policy)
    # 2. Quality the policy calls critical: the best usable tier.
    if job.quality and job.quality in policy.critical_qualities:
        clouds = ordered(job, signals, policy, best_tier_first=True)
        if clouds:
            return _to(clouds, "quality")
        return _local_or_refuse(job, signals, "quality-fallback")
    # 3. Overflow: spill when waiting here would miss the deadline (or may not wait here).
    late = (not signals.local_loaded or signals.local_wait_s > job.deadline_s
            or not job.allows(LOCAL))
    if late and (policy.spill or not job.allows(LOCAL)):
        floor = TIERS.index(job.min_tier) if job.min_tier in TIERS else 0
        takers = [n for n, s in signals.clouds.items()
                  if s.overflow and s.tier in TIERS and TIERS.index(s.tier) >= floor]
        clouds = ordered(job, signals, policy, takers)
        if clouds:
            return _to(clouds, "deadline")
    # 4. Wait locally while there is room; else 429 with the drain time.
    return _local_or_refuse(job, signals, "local")


def after_local_failure(job: JobView, signals: Signals, policy: Policy) -> list[str]:
    """Where a job goes when the local pipeline failed: every usable upstream, best
    first as for overflow (a model named explicitly: only those serving it)."""
    names = list(_serving(job, signals)) if is_cloud_name(job, signals) else None
    return ordered(job, signals, policy, names)
