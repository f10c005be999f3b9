"""server/routing/dispatch.py ``Dispatcher``: where a job runs and what it says about it
(``Served``), with fake cloud providers and a real ``LocalImages`` around a fake pipeline.

No HTTP, no weights, no sleeps: the fake pipeline makes small PIL images at once, and
the dispatcher's clock (rate windows, circuit breakers) is moved by hand.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from PIL import Image

from pipelines.base import ImageItem, NotFinite, Picture
from pipelines.registry import MODEL_ID, WeightsInfo
from server.config import Settings
from server.errors import APIError
from server.job import ChatJob, ChatOutcome, ImageJob, ImageOutcome, OutImage, Served
from server.providers.base import CloudProvider, ProviderError
from server.providers.local.batcher import BatchPolicy
from server.providers.local.images import LocalImages
from server.routing.dispatch import Dispatcher
from server.store.ledger import UsageRow

T = TypeVar("T")
LATE = 0.0  # a deadline no local run can meet: every estimate is above zero
EASY = 600.0  # a deadline any local run meets
CLOUD_IMAGE = b"cloud-image"


# -- fakes ----------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeCloud:
    """A ``CloudProvider``: answers (or fails as told) and keeps a log of its calls."""

    def __init__(self, name: str, log: list[str] | None = None,
                 price_each: float = 0.05) -> None:
        self.name = name
        self.fail: ProviderError | None = None
        self.calls: list[tuple[str, str]] = []  # (method, upstream model)
        self.log = log if log is not None else []
        self.price_each = price_each

    def _called(self, method: str, model: str) -> None:
        self.calls.append((method, model))
        self.log.append(f"{self.name}.{method}")
        if self.fail is not None:
            raise self.fail

    async def generate_images(self, job: ImageJob, model: str) -> ImageOutcome:
        self._called("generate", model)
        return ImageOutcome([OutImage(CLOUD_IMAGE, "image/png", s) for s in job.seeds],
                            model, self.price_each * job.n, request_id="req_1")

    async def edit_images(self, job: ImageJob, model: str) -> ImageOutcome:
        self._called("edit", model)
        return ImageOutcome([OutImage(CLOUD_IMAGE, "image/png", s) for s in job.seeds],
                            model, self.price_each * job.n)

    async def chat(self, job: ChatJob, model: str) -> ChatOutcome:
        self._called("chat", model)
        return ChatOutcome("from the cloud", "stop", 20, 5, model, 0.001)

    async def close(self) -> None:
        pass


def fail(provider: str, kind: Any, retry_after_s: float | None = None) -> ProviderError:
    return ProviderError(provider, kind, "upstream said no", status=500,
                         retry_after_s=retry_after_s)


def fake_pipeline(items: list[ImageItem]) -> list[Picture | NotFinite]:
    return [np.asarray(Image.new("RGB", (i.width, i.height), (i.seed % 256, 0, 0)))
            for i in items]


def broken_pipeline(items: list[ImageItem]) -> list[Picture | NotFinite]:
    raise RuntimeError("CUDA out of memory")


def settings(**router: Any) -> Settings:
    # No configured rate limits unless a test sets them: the clock decides the rest.
    return Settings(router={"rate_limits": {}, **router})


@contextmanager
def local_images(run_batch: Callable[[list[ImageItem]], list[Picture | NotFinite]] = fake_pipeline,
                 *, max_queue: int = 64, start: bool = True) -> Iterator[LocalImages]:
    weights = WeightsInfo(MODEL_ID, "tiny", Path("unused"))
    local = LocalImages(MODEL_ID, weights, run_batch,
                        BatchPolicy(max_batch=8, max_wait_s=0.0, max_queue=max_queue), 30.0)
    if start:
        local.start()
    try:
        yield local
    finally:
        local.close()


def dispatcher(s: Settings, clouds: list[FakeCloud], local: LocalImages | None,
               clock: Clock | None = None) -> Dispatcher:
    providers: dict[str, CloudProvider] = {c.name: c for c in clouds}
    d = Dispatcher(s, providers, None, clock=clock or Clock())
    d.images_local = local
    return d


def job(model: str = "auto", n: int = 1, quality: str = "auto", size: int = 64) -> ImageJob:
    return ImageJob(model=model, prompt="a red square", seeds=list(range(7, 7 + n)),
                    width=size, height=size, steps=1, quality=quality)


def chat_job(model: str = "gpt-4o-mini", text: str = "x" * 400,
             max_tokens: int = 100) -> ChatJob:
    return ChatJob(messages=[{"role": "user", "content": [{"type": "text", "text": text}]}],
                   max_tokens=max_tokens, model=model)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro
    return asyncio.run(main())


def images(d: Dispatcher, j: ImageJob, deadline_s: float, **kw: Any
           ) -> tuple[list[OutImage], Served]:
    return run(d.images(j, deadline_s, **kw))


def refused(d: Dispatcher, j: ImageJob, deadline_s: float, **kw: Any) -> APIError:
    with pytest.raises(APIError) as exc:
        images(d, j, deadline_s, **kw)
    return exc.value


def is_local_png(out: OutImage, size: int = 64) -> bool:
    return out.media_type == "image/png" and Image.open(io.BytesIO(out.data)).size == (
        size, size)


def row(route: str, cost: float, outcome: str = "ok") -> UsageRow:
    return UsageRow("/v1/images/generations", "auto", route, None, outcome, 200, images=1,
                    cost_usd=cost)


# -- explicit models ------------------------------------------------------------------------

def test_the_local_model_by_name_runs_locally_even_when_late() -> None:
    oa = FakeCloud("openai")
    with local_images() as local:
        out, served = images(dispatcher(settings(), [oa], local), job("sdxl-turbo", n=2), LATE)
    assert (served.route, served.reason) == ("local", "explicit")
    assert [o.seed for o in out] == [7, 8] and all(is_local_png(o) for o in out)
    assert oa.calls == []
    # what the same work would have cost on the default cloud: 2 medium 1024x1024 images
    assert served.cloud_equivalent_usd == pytest.approx(2 * 0.042)
    assert 0 <= served.cost_usd < 0.001 and served.queue_ms >= 0


def test_a_cloud_model_goes_to_its_cloud_with_its_cost() -> None:
    oa, gm = FakeCloud("openai", price_each=0.04), FakeCloud("gemini", price_each=0.039)
    with local_images() as local:
        d = dispatcher(settings(), [oa, gm], local)
        out, served = images(d, job("gpt-image-1", n=3), EASY)
        assert (served.route, served.reason) == ("openai", "explicit")
        assert served.cost_usd == pytest.approx(0.12)
        assert served.upstream_model == "gpt-image-1"
        assert [o.data for o in out] == [CLOUD_IMAGE] * 3
        _, served = images(d, job("gpt-image-1-mini"), EASY)  # not the configured one
        assert served.upstream_model == "gpt-image-1-mini"
        _, served = images(d, job("gemini-2.5-flash-image"), EASY)
    assert (served.route, served.reason, served.cost_usd) == ("gemini", "explicit", 0.039)
    assert oa.calls == [("generate", "gpt-image-1"), ("generate", "gpt-image-1-mini")]
    assert gm.calls == [("generate", "gemini-2.5-flash-image")]


def test_an_edit_job_uses_the_clouds_edit_call() -> None:
    oa = FakeCloud("openai")
    source = Image.new("RGB", (64, 64))
    edit = ImageJob("gpt-image-1", "p", [1], 64, 64, 1, init_images=[source], strength=0.5)
    with local_images() as local:
        _, served = images(dispatcher(settings(), [oa], local), edit, EASY)
    assert served.route == "openai" and oa.calls == [("edit", "gpt-image-1")]


def test_a_cloud_model_of_an_unconfigured_cloud_is_a_400_on_model() -> None:
    with local_images() as local:
        err = refused(dispatcher(settings(), [FakeCloud("gemini")], local),
                      job("gpt-image-1"), EASY)
    assert (err.status, err.code, err.param) == (400, "provider_not_configured", "model")
    assert "openai" in err.message


# -- spilling ---------------------------------------------------------------------------------

def test_a_job_that_would_miss_its_deadline_spills_to_the_preferred_cloud() -> None:
    oa, gm = FakeCloud("openai"), FakeCloud("gemini")
    with local_images() as local:
        _, served = images(dispatcher(settings(), [oa, gm], local), job(), LATE)
        assert (served.route, served.reason) == ("openai", "deadline")
        assert oa.calls == [("generate", "gpt-image-1")]  # the configured image model
        _, served = images(dispatcher(settings(image_provider="gemini"), [oa, gm], local),
                           job(), LATE)
    assert (served.route, served.reason) == ("gemini", "deadline")
    assert gm.calls == [("generate", "gemini-2.5-flash-image")]


def test_a_job_that_meets_its_deadline_stays_local() -> None:
    oa = FakeCloud("openai")
    with local_images() as local:
        out, served = images(dispatcher(settings(), [oa], local), job(), EASY)
    assert (served.route, served.reason) == ("local", "local") and is_local_png(out[0])
    assert oa.calls == []


def test_without_spill_a_late_job_waits_locally() -> None:
    oa = FakeCloud("openai")
    with local_images() as local:
        _, served = images(dispatcher(settings(spill=False), [oa], local), job(), LATE)
    assert served.route == "local" and oa.calls == []


def test_a_late_job_with_no_usable_cloud_runs_locally_while_there_is_room() -> None:
    with local_images() as local:
        _, served = images(dispatcher(settings(), [], local), job(), LATE)
    assert (served.route, served.reason) == ("local", "local")


def test_a_full_queue_spills_a_late_job_and_refuses_it_with_429_when_no_cloud_can() -> None:
    # Not started: what is queued stays queued.
    with local_images(max_queue=2, start=False) as local:
        local.batcher.submit(job(n=2).items(), 30.0)
        err = refused(dispatcher(settings(), [], local), job(), LATE)
        assert (err.status, err.type, err.code) == (429, "rate_limit_error", "queue_full")
        assert int(err.headers["Retry-After"]) >= 1
        assert "retry-after-ms" in err.headers
        # one cloud configured: the same job goes there instead
        oa = FakeCloud("openai")
        _, served = images(dispatcher(settings(), [oa], local), job(), LATE)
        assert (served.route, served.reason) == ("openai", "deadline")
        # with spill off nothing may go: 429 again
        err = refused(dispatcher(settings(spill=False), [oa], local), job(), LATE)
        assert err.status == 429 and len(oa.calls) == 1


# -- failures -------------------------------------------------------------------------------

def test_a_failing_cloud_fails_over_to_local_then_its_circuit_opens() -> None:
    clock = Clock()
    oa = FakeCloud("openai")
    oa.fail = fail("openai", "server")
    with local_images() as local:
        d = dispatcher(settings(breaker_failures=2, breaker_cooldown_s=30), [oa], local, clock)
        for _ in range(2):
            out, served = images(d, job(), LATE)
            assert (served.route, served.reason) == ("local", "failover")
            assert is_local_png(out[0])
        assert len(oa.calls) == 2
        # the circuit is open: the next late job is not even tried there
        _, served = images(d, job(), LATE)
        assert (served.route, served.reason) == ("local", "local")
        # and an explicit request for it is answered locally
        _, served = images(d, job("gpt-image-1"), EASY)
        assert (served.route, served.reason) == ("local", "failover")
        assert len(oa.calls) == 2
        # after the cooldown one trial goes; its success closes the circuit
        clock.advance(31)
        oa.fail = None
        for _ in range(2):
            _, served = images(d, job(), LATE)
            assert served.route == "openai"
    assert len(oa.calls) == 4


def test_with_its_circuit_open_the_other_cloud_takes_the_spill() -> None:
    oa, gm = FakeCloud("openai"), FakeCloud("gemini")
    oa.fail = fail("openai", "timeout")
    with local_images() as local:
        d = dispatcher(settings(breaker_failures=1), [oa, gm], local)
        _, served = images(d, job(), LATE)
        assert (served.route, served.reason) == ("local", "failover")
        _, served = images(d, job(), LATE)
    assert (served.route, served.reason) == ("gemini", "deadline")
    assert len(oa.calls) == 1


def test_client_errors_do_not_open_the_circuit() -> None:
    oa = FakeCloud("openai")
    oa.fail = fail("openai", "client")
    with local_images() as local:
        d = dispatcher(settings(breaker_failures=1), [oa], local)
        for _ in range(3):
            _, served = images(d, job(), LATE)
            assert served.reason == "failover"
    assert len(oa.calls) == 3


def test_a_rate_limited_cloud_is_skipped_until_its_retry_after_has_passed() -> None:
    clock = Clock()
    oa = FakeCloud("openai")
    oa.fail = fail("openai", "rate_limited", retry_after_s=20)
    with local_images() as local:
        d = dispatcher(settings(breaker_failures=1), [oa], local, clock)
        _, served = images(d, job(), LATE)
        assert (served.route, served.reason) == ("local", "failover")
        oa.fail = None
        clock.advance(19)
        _, served = images(d, job(), LATE)
        assert (served.route, served.reason) == ("local", "local")
        _, served = images(d, job("gpt-image-1"), EASY)
        assert (served.route, served.reason) == ("local", "failover")
        assert len(oa.calls) == 1
        # a 429 is not a failure: with breaker_failures=1 the circuit is still closed
        clock.advance(2)
        _, served = images(d, job(), LATE)
    assert (served.route, served.reason) == ("openai", "deadline")
    assert len(oa.calls) == 2


def test_a_cloud_failure_with_a_full_local_queue_is_refused_with_the_upstreams_wait() -> None:
    with local_images(max_queue=1, start=False) as local:
        local.batcher.submit(job().items(), 30.0)
        oa = FakeCloud("openai")
        oa.fail = fail("openai", "rate_limited", retry_after_s=7)
        err = refused(dispatcher(settings(), [oa], local), job(), LATE)
        assert (err.status, err.code, err.type) == (429, "rate_limit_exceeded",
                                                    "rate_limit_error")
        assert err.headers["Retry-After"] == "7"
        oa.fail = fail("openai", "server")
        err = refused(dispatcher(settings(), [oa], local), job(), LATE)
        assert (err.status, err.code, err.type) == (502, "upstream_error", "server_error")
        assert err.headers["Retry-After"] == "1"


def test_a_local_pipeline_failure_retries_on_the_cloud() -> None:
    oa = FakeCloud("openai")
    with local_images(broken_pipeline) as local:
        _, served = images(dispatcher(settings(), [oa], local), job(), EASY)
        assert (served.route, served.reason) == ("openai", "local-failure")
        err = refused(dispatcher(settings(local_failover=False), [oa], local), job(), EASY)
    assert (err.status, err.code) == (500, "pipeline_error")
    assert "CUDA out of memory" in err.message
    assert len(oa.calls) == 1


# -- before_send ------------------------------------------------------------------------------

def test_before_send_is_told_the_provider_and_model_before_the_call() -> None:
    log: list[str] = []
    oa = FakeCloud("openai", log)

    async def before_send(provider: str, model: str) -> None:
        log.append(f"before {provider} {model}")

    with local_images() as local:
        _, served = images(dispatcher(settings(), [oa], local), job(), LATE,
                           before_send=before_send)
    assert served.route == "openai"
    assert log == ["before openai gpt-image-1", "openai.generate"]


def test_a_before_send_that_refuses_stops_the_call_and_frees_the_circuit_slot() -> None:
    clock = Clock()
    oa = FakeCloud("openai")
    oa.fail = fail("openai", "server")

    async def refuse(provider: str, model: str) -> None:
        raise RuntimeError("this item may not go upstream")

    with local_images() as local:
        d = dispatcher(settings(breaker_failures=1, breaker_cooldown_s=30), [oa], local, clock)
        images(d, job(), LATE)  # fails over, opens the circuit
        clock.advance(31)  # half-open: one trial may go
        oa.fail = None
        with pytest.raises(RuntimeError, match="may not go upstream"):
            images(d, job(), LATE, before_send=refuse)
        assert len(oa.calls) == 1
        # the trial slot was given back: the next job still gets the cloud
        _, served = images(d, job(), LATE)
    assert (served.route, served.reason) == ("openai", "deadline")
    assert len(oa.calls) == 2


# -- money ----------------------------------------------------------------------------------

def test_cost_ceiling_is_the_dearest_configured_cloud() -> None:
    s = settings()
    assert Dispatcher(s, {}, None).cost_ceiling(job(n=2, quality="high")) == 0.0
    oa, gm = FakeCloud("openai"), FakeCloud("gemini")
    only_openai = Dispatcher(s, {"openai": oa}, None)
    both = Dispatcher(s, {"openai": oa, "gemini": gm}, None)
    assert only_openai.cost_ceiling(job(n=2, quality="high")) == pytest.approx(2 * 0.167)
    assert both.cost_ceiling(job(n=2, quality="high")) == pytest.approx(2 * 0.167)
    assert both.cost_ceiling(job(n=2, quality="low")) == pytest.approx(2 * 0.039)  # gemini
    # chat: about 4 characters a token, the whole max_tokens as completion
    chat = chat_job(text="x" * 4000, max_tokens=1000)
    assert only_openai.cost_ceiling(chat) == pytest.approx(
        (1000 * 0.15 + 1000 * 0.60) / 1e6)
    assert both.cost_ceiling(chat) == pytest.approx((1000 * 0.30 + 1000 * 2.50) / 1e6)


def test_recorded_spend_exhausts_a_daily_budget_and_stops_spilling() -> None:
    oa = FakeCloud("openai")
    with local_images() as local:
        d = dispatcher(settings(daily_budget_usd={"openai": 0.10}), [oa], local)
        _, served = images(d, job(), LATE)
        assert served.route == "openai"
        # failures, local work and another provider's spend do not count against it
        for r in (row("openai", 1.0, outcome="error"), row("local", 1.0), row("gemini", 1.0)):
            run(d.record(r))
        _, served = images(d, job(), LATE)
        assert served.route == "openai"
        run(d.record(row("openai", 0.07)))  # 0.03 left; a job costs 0.042 there
        _, served = images(d, job(), LATE)
        assert (served.route, served.reason) == ("local", "local")
        # an explicit request for it is answered locally too
        _, served = images(d, job("gpt-image-1"), EASY)
        assert (served.route, served.reason) == ("local", "failover")
    assert len(oa.calls) == 2


def test_the_total_budget_counts_every_cloud() -> None:
    oa, gm = FakeCloud("openai"), FakeCloud("gemini", price_each=0.039)
    with local_images() as local:
        d = dispatcher(settings(daily_budget_usd={"total": 0.06}), [oa, gm], local)
        run(d.record(row("gemini", 0.02)))
        # 0.04 left: openai's 0.042 does not fit, gemini's 0.039 does
        _, served = images(d, job(), LATE)
        assert (served.route, served.reason) == ("gemini", "deadline")
        run(d.record(row("gemini", served.cost_usd)))
        _, served = images(d, job(), LATE)
        assert (served.route, served.reason) == ("local", "local")
    assert oa.calls == [] and len(gm.calls) == 1


# -- chat without a local model ------------------------------------------------------------

def test_a_cloud_chat_model_goes_to_its_cloud() -> None:
    oa = FakeCloud("openai")
    outcome, served = run(dispatcher(settings(), [oa], None).chat(chat_job(), EASY))
    assert outcome.text == "from the cloud"
    assert (served.route, served.reason, served.upstream_model) == ("openai", "explicit",
                                                                    "gpt-4o-mini")
    assert (served.cost_usd, served.prompt_tokens, served.completion_tokens) == (0.001, 20, 5)
    assert served.cloud_equivalent_usd == pytest.approx((20 * 0.15 + 5 * 0.60) / 1e6)


def test_a_chat_whose_cloud_fails_with_no_local_model_is_a_502() -> None:
    oa = FakeCloud("openai")
    oa.fail = fail("openai", "server")
    with pytest.raises(APIError) as exc:
        run(dispatcher(settings(), [oa], None).chat(chat_job(), EASY))
    assert (exc.value.status, exc.value.code) == (502, "upstream_error")
    assert exc.value.headers["Retry-After"] == "1"


def test_an_auto_chat_with_nothing_to_answer_it_is_a_503() -> None:
    with pytest.raises(APIError) as exc:
        run(dispatcher(settings(), [], None).chat(chat_job("auto"), EASY))
    assert (exc.value.status, exc.value.code) == (503, "model_not_ready")
