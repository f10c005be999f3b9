"""Routing over many upstreams (issue 14): cheapest usable first, the best tier for a
critical quality, overflow only to upstreams of at least the job's tier, bulk work only
where its tiers allow. ``decide`` is pure: states in, a route out."""

from __future__ import annotations

from server.routing.decide import CloudState, JobView, Policy, Signals, decide

POLICY = Policy(spill=True, critical_qualities=frozenset({"high"}), preferred=None,
                local_ids=frozenset({"sdxl-turbo", "auto"}))
# Three upstreams of OpenAI-shaped images: two relays and the vendor itself.
TIERS = {"relay-a": "economy", "relay-b": "economy", "azure": "standard", "openai": "premium"}
PRICE = {"relay-a": 0.020, "relay-b": 0.025, "azure": 0.040, "openai": 0.042}


def state(name: str, *, circuit: bool = True, wait: float = 0.0, spent: float = 0.0,
          budget: float | None = None, overflow: bool = True,
          configured: bool = True) -> CloudState:
    return CloudState(configured, circuit, wait, spent, budget, TIERS[name], overflow)


def clouds(**changes: CloudState) -> dict[str, CloudState]:
    return {name: changes.get(name.replace("-", "_"), state(name)) for name in TIERS}


def job(model: str | None = "auto", quality: str = "auto", *, min_tier: str = "economy",
        tiers: frozenset[str] | None = None, serving: tuple[str, ...] | None = None,
        prices: dict[str, float | None] | None = None) -> JobView:
    return JobView("image", model, quality, 1.0, dict(prices or PRICE), serving, min_tier,
                   tiers)


def late(states: dict[str, CloudState], total_left: float | None = None,
         room: bool = True) -> Signals:
    return Signals(True, 30.0, room, 5.0, states, total_left)


def on_time(states: dict[str, CloudState]) -> Signals:
    return Signals(True, 0.1, True, 5.0, states)


def test_overflow_goes_to_the_cheapest_usable_upstream() -> None:
    route = decide(job(), late(clouds()), POLICY)
    assert (route.where, route.reason) == ("relay-a", "deadline")
    # a job that meets its deadline stays here, whatever the clouds cost
    assert decide(job(), on_time(clouds()), POLICY).where == "local"


def test_a_relay_at_its_rate_limit_yields_to_the_next_then_to_premium_if_allowed() -> None:
    full = clouds(relay_a=state("relay-a", wait=3.0))
    assert decide(job(), late(full), POLICY).where == "relay-b"
    both = clouds(relay_a=state("relay-a", wait=3.0), relay_b=state("relay-b", wait=1.0),
                  azure=state("azure", circuit=False))
    assert decide(job(), late(both), POLICY).where == "openai"
    # bulk work that allows local and economy only: premium is not for it
    cheap_only = job(tiers=frozenset({"local", "economy"}))
    route = decide(cheap_only, late(both), POLICY)
    assert (route.where, route.reason) == ("local", "local")


def test_a_critical_quality_goes_to_the_best_tier_that_is_usable() -> None:
    route = decide(job(quality="high"), on_time(clouds()), POLICY)
    assert (route.where, route.reason) == ("openai", "quality")
    premium_down = clouds(openai=state("openai", circuit=False))
    assert decide(job(quality="high"), on_time(premium_down), POLICY).where == "azure"


def test_overflow_takes_only_upstreams_of_at_least_the_jobs_tier() -> None:
    assert decide(job(min_tier="standard"), late(clouds()), POLICY).where == "azure"
    assert decide(job(min_tier="premium"), late(clouds()), POLICY).where == "openai"


def test_an_upstream_closed_to_overflow_takes_only_work_named_for_it() -> None:
    closed = clouds(relay_a=state("relay-a", overflow=False))
    assert decide(job(), late(closed), POLICY).where == "relay-b"
    named = decide(job("gpt-image-1", serving=("relay-a",)), late(closed), POLICY)
    assert (named.where, named.reason) == ("relay-a", "explicit")


def test_a_named_model_goes_to_the_cheapest_upstream_serving_it_then_the_next() -> None:
    route = decide(job("gpt-image-1", serving=("openai", "relay-b", "azure")),
                   on_time(clouds()), POLICY)
    assert (route.where, route.reason, route.then) == ("relay-b", "explicit",
                                                      ("azure", "openai"))
    # overflow and quality routes name no next upstream: a failure there comes back here
    assert decide(job(), late(clouds()), POLICY).then == ()


def test_the_preferred_upstream_goes_first_whenever_it_is_usable() -> None:
    preferred = Policy(True, POLICY.critical_qualities, "azure", POLICY.local_ids)
    assert decide(job(), late(clouds()), preferred).where == "azure"
    azure_down = clouds(azure=state("azure", circuit=False))
    assert decide(job(), late(azure_down), preferred).where == "relay-a"


def test_budgets_per_upstream_and_in_total() -> None:
    spent = clouds(relay_a=state("relay-a", spent=0.99, budget=1.0))
    assert decide(job(), late(spent), POLICY).where == "relay-b"
    # 0.02 left in total: only what costs at most that may go, and nothing does here
    route = decide(job(), late(clouds(), total_left=0.019), POLICY)
    assert route.where == "local"
    assert decide(job(), late(clouds(), total_left=0.02), POLICY).where == "relay-a"


def test_an_unpriced_model_is_never_sent() -> None:
    prices: dict[str, float | None] = {**PRICE, "relay-a": None}
    assert decide(job(prices=prices), late(clouds()), POLICY).where == "relay-b"
    nowhere = {name: None for name in PRICE}
    route = decide(job("gpt-image-9", serving=tuple(PRICE), prices=nowhere),
                   on_time(clouds()), POLICY)
    assert (route.status, route.code) == (400, "model_not_priced")


def test_bulk_tiers_bound_named_models_and_may_leave_out_this_box() -> None:
    economy = frozenset({"economy"})
    named = decide(job("gpt-image-1", serving=("openai",), tiers=economy), on_time(clouds()),
                   POLICY)
    assert (named.status, named.code) == (400, "tier_not_allowed")
    # no local tier: the work goes to an allowed upstream even when it would be on time
    assert decide(job(tiers=economy), on_time(clouds()), POLICY).where == "relay-a"
    down = clouds(relay_a=state("relay-a", circuit=False),
                  relay_b=state("relay-b", circuit=False))
    route = decide(job(tiers=economy), on_time(down), POLICY)
    assert (route.where, route.status, route.code) == ("reject", 503,
                                                       "no_upstream_available")
