"""The Claude upstream (server/providers/anthropic.py) against a fake Messages API on
loopback, through the real anthropic SDK: what it sends, what it makes of the answer,
and how each failure reaches the router, with the key never in a message."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from PIL import Image
from pydantic import SecretStr

from server.config import Prices, UpstreamSettings
from server.job import ChatJob, ImageJob
from server.providers.anthropic import AnthropicProvider
from server.providers.base import ProviderError
from tests.fakes import key_variants
from tests.fakes.anthropic_server import FakeAnthropic, image_blocks, running_fake_anthropic
from tests.fakes.canary import running_canary

KEY = "sk-ant-api03-SECRET-0123456789abcdef"
T = TypeVar("T")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAnthropic]:
    with running_fake_anthropic() as f:
        yield f


@pytest.fixture(autouse=True)
def _reset(fake: FakeAnthropic) -> None:
    fake.reset()


def provider(fake: FakeAnthropic, **over: Any) -> AnthropicProvider:
    up = UpstreamSettings(name="claude", kind="anthropic", base_url=fake.url,
                          api_key=SecretStr(KEY), timeout_s=2.0, **over)
    return AnthropicProvider(up, Prices())


def run(p: AnthropicProvider, call: Callable[[AnthropicProvider], Awaitable[T]]) -> T:
    async def main() -> T:
        try:
            return await call(p)
        finally:
            await p.close()
    return asyncio.run(main())


def job(text: str = "describe it", images: int = 0, **kw: Any) -> ChatJob:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image"}] * images
    pictures = [Image.new("RGB", (3000, 1500), (10, 20, 30)) for _ in range(images)]
    return ChatJob(messages=[{"role": "system", "content": [{"type": "text", "text": "Terse."}]},
                             {"role": "user", "content": parts}],
                   images=pictures, model="claude-haiku-4-5", **kw)


def test_a_chat_with_an_image_system_prompt_and_stop(fake: FakeAnthropic) -> None:
    out = run(provider(fake), lambda p: p.chat(job(images=1, stop=("never",), max_tokens=30),
                                               "claude-haiku-4-5"))
    assert out.text == "echo: describe it [images: 1] (system: Terse.)"
    assert out.finish_reason == "stop" and out.model == "claude-haiku-4-5"
    # genai-prices: $1 in and $5 out per million for Claude Haiku 4.5
    assert out.cost_usd == pytest.approx((out.prompt_tokens + 5 * out.completion_tokens) / 1e6)
    [call] = fake.calls
    body = call.body
    assert (body["model"], body["max_tokens"], body["system"], body["stop_sequences"]) == (
        "claude-haiku-4-5", 30, "Terse.", ["never"])
    assert "temperature" not in body and "top_p" not in body  # left at Claude's default
    [block] = image_blocks(body)
    sent = Image.open(io.BytesIO(base64.b64decode(block["source"]["data"])))
    assert sent.size == (1568, 784)  # Claude's longest edge: more pixels only cost upload


def test_sampling_goes_when_the_client_sets_it_and_names_map(fake: FakeAnthropic) -> None:
    run(provider(fake, upstream_models={"claude-haiku-4-5": "claude-haiku-4-5-20251001"}),
        lambda p: p.chat(job(temperature=1.7), "claude-haiku-4-5"))
    run(provider(fake), lambda p: p.chat(job(top_p=0.5), "claude-haiku-4-5"))
    first, second = (c.body for c in fake.calls)
    assert (first["model"], first["temperature"]) == ("claude-haiku-4-5-20251001", 1.0)
    assert second["top_p"] == 0.5 and "temperature" not in second


def test_length_and_stop_sequences_become_openai_finish_reasons(fake: FakeAnthropic) -> None:
    out = run(provider(fake), lambda p: p.chat(job(max_tokens=2), "claude-haiku-4-5"))
    assert (out.text, out.finish_reason, out.completion_tokens) == ("echo: describe", "length", 2)
    out = run(provider(fake), lambda p: p.chat(job("a b [images:", stop=("[images:",)),
                                               "claude-haiku-4-5"))
    assert out.text == "echo: a b" and out.finish_reason == "stop"


@pytest.mark.parametrize(("mode", "kind", "trips"), [
    ("rate_limit", "rate_limited", False), ("error500", "server", True),
    ("error503", "server", True), ("auth", "auth", False), ("malformed", "malformed", True),
    ("wrong_shape", "malformed", True)])
def test_failures_reach_the_router_classified(fake: FakeAnthropic, mode: str, kind: str,
                                              trips: bool) -> None:
    fake.set_mode(mode)
    fake.echo_variants = True
    with pytest.raises(ProviderError) as exc:
        run(provider(fake), lambda p: p.chat(job(), "claude-haiku-4-5"))
    err = exc.value
    assert (err.provider, err.kind, err.trips_breaker) == ("claude", kind, trips)
    if mode == "rate_limit":
        assert err.retry_after_s == 7
    if mode == "error503":
        assert err.status == 529  # Anthropic's "overloaded"
    for variant in (KEY, *key_variants(KEY).values()):
        assert variant not in str(err)


def test_a_redirect_is_not_followed_and_the_key_stays_home(fake: FakeAnthropic) -> None:
    with running_canary() as canary:
        fake.redirect_to = canary.url + "/stolen"
        fake.set_mode("redirect")
        with pytest.raises(ProviderError) as exc:
            run(provider(fake), lambda p: p.chat(job(), "claude-haiku-4-5"))
        assert exc.value.kind == "server" and canary.calls == []


def test_claude_makes_no_images(fake: FakeAnthropic) -> None:
    image = ImageJob("claude-haiku-4-5", "a cat", [1], 64, 64, 1)
    with pytest.raises(ProviderError) as exc:
        run(provider(fake), lambda p: p.generate_images(image, "claude-haiku-4-5"))
    assert exc.value.kind == "client" and fake.calls == []
    with pytest.raises(ValueError, match="image_model: Claude does not make images"):
        UpstreamSettings(name="c", kind="anthropic", api_key=SecretStr(KEY),
                         image_model="claude-haiku-4-5")


def test_a_streamed_answer_comes_as_claude_writes_it(fake: FakeAnthropic) -> None:
    async def collect(p: AnthropicProvider) -> list[Any]:
        return [chunk async for chunk in p.stream_chat(job(max_tokens=30), "claude-haiku-4-5")]

    *pieces, outcome = run(provider(fake), collect)
    assert pieces == ["echo:", " describe", " it", " [images:", " 0]", " (system:", " Terse.)"]
    assert outcome.text == "".join(pieces) and outcome.finish_reason == "stop"
    assert outcome.completion_tokens == 6 and outcome.cost_usd > 0
    assert fake.calls[0].body["stream"] is True


def test_a_stream_that_breaks_midway_is_a_server_failure(fake: FakeAnthropic) -> None:
    fake.fail_mid_stream = True
    got: list[Any] = []

    async def collect(p: AnthropicProvider) -> None:
        async for chunk in p.stream_chat(job(), "claude-haiku-4-5"):
            got.append(chunk)

    with pytest.raises(ProviderError) as exc:
        run(provider(fake), collect)
    assert got == ["echo:"]
    assert (exc.value.kind, exc.value.status, exc.value.trips_breaker) == ("server", 529, True)
