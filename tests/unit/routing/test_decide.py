"""Routing policy, rate limits and circuit breakers: pure logic, a clock the test moves."""

from __future__ import annotations

import pytest

from server.config import RateLimit
from server.routing.decide import CloudState, JobView, Policy, Signals, cloud_of, decide
from server.routing.limits import CircuitBreaker, RateLimiter

POLICY = Policy(spill=True, critical_qualities=frozenset({"high", "hd"}), preferred="openai",
                local_ids=frozenset({"sdxl-turbo", "auto"}))
OK = CloudState(configured=True, circuit_ok=True, rate_wait_s=0, spent_today=0, budget=10)


def job(model: str | None = None, quality: str | None = "auto", deadline: float = 5.0,
        cost: float = 0.04) -> JobView:
    return JobView("image", model, quality, deadline, {"openai": cost, "gemini": cost})


def signals(wait: float = 1.0, room: bool = True, loaded: bool = True,
            openai: CloudState = OK, gemini: CloudState = OK,
            total_left: float | None = None) -> Signals:
    return Signals(loaded, wait, room, 7.0, {"openai": openai, "gemini": gemini}, total_left)


def test_cloud_of() -> None:
    assert cloud_of("gpt-image-1") == cloud_of("gpt-4o-mini") == cloud_of("dall-e-3") == "openai"
    assert cloud_of("gemini-2.5-flash-image") == "gemini"
    assert cloud_of("sdxl-turbo") is cloud_of(None) is cloud_of("auto") is None


def test_explicit_models_win() -> None:
    assert decide(job("gpt-image-1"), signals(wait=0), POLICY).where == "openai"
    assert decide(job("gemini-2.5-flash-image"), signals(wait=0), POLICY).where == "gemini"
    # an explicit local model stays local even when late
    assert decide(job("sdxl-turbo"), signals(wait=99), POLICY).where == "local"
    full = decide(job("sdxl-turbo"), signals(wait=99, room=False), POLICY)
    assert (full.where, full.status, full.retry_after_s) == ("reject", 429, 7.0)


def test_explicit_cloud_not_configured_is_a_4xx() -> None:
    off = CloudState(False, True, 0, 0, None)
    route = decide(job("gpt-image-1"), signals(openai=off), POLICY)
    assert (route.where, route.status, route.code) == ("reject", 400, "provider_not_configured")


def test_explicit_cloud_unavailable_falls_back_to_local_or_refuses() -> None:
    broken = CloudState(True, False, 0, 0, 10)
    assert decide(job("gpt-image-1"), signals(openai=broken), POLICY).reason == "failover"
    limited = CloudState(True, True, 12.0, 0, 10)
    route = decide(job("gpt-image-1"), signals(openai=limited, room=False), POLICY)
    assert (route.status, route.retry_after_s) == (429, 12.0)


def test_critical_quality_goes_to_preferred_cloud_then_the_other() -> None:
    assert decide(job(quality="high"), signals(wait=0), POLICY).where == "openai"
    down = CloudState(True, False, 0, 0, 10)
    route = decide(job(quality="hd"), signals(wait=0, openai=down), POLICY)
    assert (route.where, route.reason) == ("gemini", "quality")
    both_down = decide(job(quality="high"), signals(openai=down, gemini=down), POLICY)
    assert (both_down.where, both_down.reason) == ("local", "quality-fallback")


def test_spill_exactly_when_the_deadline_would_be_missed() -> None:
    assert decide(job(deadline=5), signals(wait=4.9), POLICY).where == "local"
    assert decide(job(deadline=5), signals(wait=5.0), POLICY).where == "local"
    spilled = decide(job(deadline=5), signals(wait=5.1), POLICY)
    assert (spilled.where, spilled.reason) == ("openai", "deadline")
    no_spill = Policy(False, POLICY.critical_qualities, "openai", POLICY.local_ids)
    assert decide(job(deadline=5), signals(wait=50), no_spill).where == "local"


def test_not_loaded_spills_or_says_503() -> None:
    assert decide(job(), signals(loaded=False), POLICY).where == "openai"
    off = CloudState(False, True, 0, 0, None)
    route = decide(job(), signals(loaded=False, openai=off, gemini=off), POLICY)
    assert (route.where, route.status) == ("reject", 503)


def test_budget_spent_means_no_spilling() -> None:
    spent = CloudState(True, True, 0, spent_today=9.99, budget=10)
    route = decide(job(cost=0.04), signals(wait=99, openai=spent, gemini=spent), POLICY)
    assert route.where == "local"
    exactly = CloudState(True, True, 0, spent_today=9.96, budget=10)
    assert decide(job(cost=0.04), signals(wait=99, openai=exactly), POLICY).where == "openai"
    # the total budget binds across providers
    assert decide(job(cost=0.04), signals(wait=99, total_left=0.01), POLICY).where == "local"
    full = decide(job(cost=0.04), signals(wait=99, room=False, openai=spent, gemini=spent),
                  POLICY)
    assert (full.status, full.code) == (429, "queue_full")


def state(spent: float, budget: float | None) -> CloudState:
    return CloudState(True, True, 0, spent_today=spent, budget=budget)


def test_the_budget_rule_at_and_over_the_limit() -> None:
    assert state(0, 20).usable(20.0, None)  # exactly at the limit
    assert not state(0, 20).usable(20.01, None)
    assert state(19, 20).usable(1.0, None)
    assert not state(19, 20).usable(1.000001, None)
    assert not state(20, 20).usable(0.01, None)
    assert state(20, 20).usable(0.0, None)
    # float sums that land on the limit are on it, not over it
    assert state(0.1 + 0.2, 0.3).usable(0.0, None)
    assert state(0.1, 0.3).usable(0.2, 0.3 - 0.1)
    # what is left of the total binds as well; no budget is no limit; zero allows free work
    assert not state(0, None).usable(1.5, 1.0)
    assert state(1e6, None).usable(1e6, None)
    assert state(0, 0.0).usable(0.0, None)
    assert not state(0, 0.0).usable(0.001, None)


def test_rate_limited_cloud_is_skipped() -> None:
    limited = CloudState(True, True, 3.0, 0, 10)
    route = decide(job(), signals(wait=99, openai=limited), POLICY)
    assert route.where == "gemini"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_limiter_minute_and_burst() -> None:
    clock = Clock()
    rl = RateLimiter({"gpt-image-1": RateLimit(per_minute=5, burst=3, burst_window_s=10)}, clock)
    assert [rl.try_acquire("gpt-image-1") for _ in range(4)] == [True, True, True, False]
    assert rl.wait_s("gpt-image-1") == pytest.approx(10)
    clock.t += 10
    assert [rl.try_acquire("gpt-image-1") for _ in range(3)] == [True, True, False]
    assert rl.wait_s("gpt-image-1") == pytest.approx(50)  # 5 in the last minute
    clock.t += 50
    assert rl.try_acquire("gpt-image-1")
    assert rl.try_acquire("unlimited-model")


def test_rate_limiter_honours_upstream_retry_after() -> None:
    clock = Clock()
    rl = RateLimiter({"m": RateLimit(per_minute=100, burst=100)}, clock)
    rl.upstream_limited("m", 7.0)
    assert not rl.try_acquire("m") and rl.wait_s("m") == pytest.approx(7)
    assert rl.upstream_429s("m") == 1
    clock.t += 7
    assert rl.try_acquire("m")


def test_breaker_opens_cools_down_and_takes_one_trial() -> None:
    clock = Clock()
    br = CircuitBreaker(failures=3, cooldown_s=30, clock=clock)
    for _ in range(2):
        br.record_failure()
    assert br.state == "closed"
    br.record_success()  # a success resets the streak
    for _ in range(3):
        br.record_failure()
    assert br.state == "open" and not br.try_acquire()
    clock.t += 30
    assert br.state == "half_open"
    assert br.try_acquire() and not br.try_acquire()  # one trial only
    br.record_failure()  # the trial failed: open again
    assert br.state == "open"
    clock.t += 30
    assert br.try_acquire()
    br.record_success()
    assert br.state == "closed" and br.try_acquire() and br.try_acquire()


def test_interactive_items_go_before_bulk_ones() -> None:
    from dataclasses import dataclass

    from server.providers.local.batcher import BatchPolicy, Pending, form_batch

    @dataclass(frozen=True)
    class It:
        name: str
        side: int

        @property
        def shape_key(self) -> int:
            return self.side

        @property
        def pixels(self) -> int:
            return self.side * self.side

    pending = [Pending(It("bulk-a", 64), 0.0, 99, bulk=True),
               Pending(It("bulk-b", 128), 0.1, 99, bulk=True),
               Pending(It("live", 128), 0.2, 99),
               Pending(It("bulk-c", 128), 0.3, 99, bulk=True)]
    policy = BatchPolicy(max_batch=2, max_wait_s=0.0)
    taken = [pending[i].item.name for i in form_batch(pending, 1.0, policy).take]
    # the interactive item leads (its shape, 128) though bulk work is older; bulk fills in
    assert taken == ["live", "bulk-b"]


def test_an_unpriced_model_is_never_sent() -> None:
    """Asked for by name: a 400 naming it. Where overflow or a critical quality would take
    it: that cloud is not usable, the next one (or local) takes the job."""
    unpriced_openai = JobView("vision", "gpt-made-up", None, 5.0,
                              {"openai": None, "gemini": 0.01})
    route = decide(unpriced_openai, signals(wait=0), POLICY)
    assert (route.where, route.status, route.code) == ("reject", 400, "model_not_priced")
    assert "'gpt-made-up'" in route.message
    overflow = JobView("vision", None, "high", 1.0, {"openai": None, "gemini": 0.01})
    assert decide(overflow, signals(wait=9), POLICY).where == "gemini"
    nowhere = JobView("vision", None, "high", 1.0, {"openai": None, "gemini": None})
    assert decide(nowhere, signals(wait=0.5), POLICY).where == "local"
