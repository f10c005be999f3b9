"""The warm-up before /readyz: the first request of a fresh server is routed on measured
costs. A 256x256 image takes the tiny model ~0.1 s here; without a measurement the
estimate is the prior (0.5 s), so a tight deadline would send it to the cloud."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from server.app import create_app
from server.config import (
    BatchSettings,
    ImageSettings,
    OpenAISettings,
    RateLimit,
    RouterSettings,
    Settings,
)
from tests.conftest import serve
from tests.fakes.openai_server import running_fake_openai

DEADLINE_MS = 450  # far above what the tiny model takes, below the 0.5 s prior


@pytest.mark.parametrize(("warmup", "route"), [(True, "local"), (False, "openai")])
def test_the_first_tight_deadline_is_judged_on_measured_cost(
        tiny_weights: Path, warmup: bool, route: str) -> None:
    with running_fake_openai() as oa:
        settings = Settings(
            weights_dir=tiny_weights, batch=BatchSettings(warmup=warmup),
            images=ImageSettings(default_size="256x256"),
            openai=OpenAISettings(api_key=SecretStr("sk-test-warmup-0123456789"),
                                  base_url=f"{oa.url}/v1", timeout_s=5.0),
            router=RouterSettings(rate_limits={"gpt-image-1": RateLimit(per_minute=100,
                                                                        burst=100)}))
        with serve(create_app(settings, chat_loader=None)) as base:
            r = httpx.post(f"{base}/v1/images/generations", timeout=60,
                           headers={"x-spillway-max-wait-ms": str(DEADLINE_MS)},
                           json={"prompt": "a red bicycle", "size": "256x256"})
    assert r.status_code == 200, r.text
    assert r.headers["x-spillway-route"] == route
