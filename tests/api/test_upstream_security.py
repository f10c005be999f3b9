"""What a hostile upstream (or relay) cannot get out of Spillway.

A redirect: whatever answers at the configured base URL may say ``307 Location:`` some
other origin. The SDKs follow redirects by default and strip only ``Authorization``
across origins, so ``x-goog-api-key`` (Gemini) and ``api-key`` (Azure) would go along.
Spillway does not follow upstream redirects at all: the canary, a server on another
loopback port, must see no request, and Spillway's own client gets a clean error.

The log: an upstream that hands the key back disguised (upper-cased, reversed, base64,
split by whitespace) or as a request id, to a server at debug level, finds none of it in
what ``spillway serve`` prints.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image
from pydantic import SecretStr

from server.app import create_app
from server.config import (
    GeminiSettings,
    OpenAISettings,
    Prices,
    RateLimit,
    RouterSettings,
    Settings,
)
from server.job import ChatJob, ImageJob
from server.providers.base import ProviderError
from server.providers.gemini import GeminiProvider
from server.providers.openai import OpenAIProvider
from tests.conftest import free_port, serve
from tests.fakes import FakeUpstream, key_variants
from tests.fakes.canary import Canary, running_canary
from tests.fakes.gemini_server import FakeGemini, running_fake_gemini
from tests.fakes.openai_server import FakeOpenAI, running_fake_openai

OPENAI_KEY = "sk-test-redirect-0123456789abcdef"
GEMINI_KEY = "AIza" + "TEST-redirect-abcdefghijklmn"
ADMIN_KEY = "spillway-admin-" + "Kq7vX2mNp9"
SPILLWAY = str(Path(sys.executable).with_name("spillway"))
ROOMY = {m: RateLimit(per_minute=1000, burst=1000) for m in
         ("gpt-image-1", "gemini-2.5-flash-image", "gpt-4o-mini", "gemini-2.5-flash")}


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeOpenAI, FakeGemini, Canary]]:
    with running_fake_openai() as oa, running_fake_gemini() as gm, running_canary() as canary:
        yield oa, gm, canary


@pytest.fixture
def redirecting(upstreams: tuple[FakeOpenAI, FakeGemini, Canary]
                ) -> tuple[FakeOpenAI, FakeGemini, Canary]:
    """Both fakes answer every call with a 307 to the canary."""
    for fake in upstreams:
        fake.reset()
    oa, gm, canary = upstreams
    for fake in (oa, gm):
        fake.set_mode("redirect")
        fake.redirect_to = f"{canary.url}/stolen"
    return upstreams


def image_job() -> ImageJob:
    return ImageJob(model="sdxl-turbo", prompt="a lighthouse", seeds=[0], width=512,
                    height=512, steps=1, quality="auto", output_format="png")


def chat_job() -> ChatJob:
    return ChatJob(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])


def provider_for(which: str, oa: FakeOpenAI, gm: FakeGemini
                 ) -> tuple[OpenAIProvider | GeminiProvider, FakeUpstream]:
    if which == "gemini":
        return GeminiProvider(GeminiSettings(api_key=SecretStr(GEMINI_KEY), base_url=gm.url,
                                             timeout_s=5), Prices()), gm
    if which == "azure":
        return OpenAIProvider(OpenAISettings(api_key=SecretStr(OPENAI_KEY),
                                             azure_endpoint=oa.url, timeout_s=5), Prices()), oa
    return OpenAIProvider(OpenAISettings(api_key=SecretStr(OPENAI_KEY), base_url=oa.base_url,
                                         timeout_s=5), Prices()), oa


def call_for(which: str, op: str) -> Callable[[Any], Awaitable[Any]]:
    image_model = "gemini-2.5-flash-image" if which == "gemini" else "gpt-image-1"
    chat_model = "gemini-2.5-flash" if which == "gemini" else "gpt-4o-mini"
    if op == "generate":
        return lambda p: p.generate_images(image_job(), image_model)
    if op == "edit":
        job = image_job()
        job = ImageJob(**{**job.__dict__, "init_images": [Image.new("RGB", (64, 64))],
                          "strength": 0.5})
        return lambda p: p.edit_images(job, image_model)
    return lambda p: p.chat(chat_job(), chat_model)


@pytest.mark.parametrize("op", ["generate", "edit", "chat"])
@pytest.mark.parametrize("which", ["openai", "azure", "gemini"])
def test_provider_does_not_follow_an_upstream_redirect(
        redirecting: tuple[FakeOpenAI, FakeGemini, Canary], which: str, op: str) -> None:
    oa, gm, canary = redirecting
    provider, fake = provider_for(which, oa, gm)

    async def main() -> Any:
        try:
            return await call_for(which, op)(provider)
        finally:
            await provider.close()

    with pytest.raises(ProviderError) as info:
        asyncio.run(main())
    assert len(fake.calls) == 1  # the upstream was asked once...
    assert canary.calls == []  # ...and nothing went where it pointed
    assert canary.credentials_seen() == []
    err = info.value
    # A redirect is the upstream misbehaving: it counts against its circuit, and the
    # router fails over (it is not the client's request that was wrong).
    assert err.kind == "server" and err.trips_breaker and err.status == 307
    assert OPENAI_KEY not in str(err) and GEMINI_KEY not in str(err)


def test_spillway_client_gets_a_clean_502_not_the_redirect(
        redirecting: tuple[FakeOpenAI, FakeGemini, Canary]) -> None:
    """Through the whole server: a cloud-only box whose upstreams both redirect."""
    oa, gm, canary = redirecting
    settings = Settings(
        openai=OpenAISettings(api_key=SecretStr(OPENAI_KEY), base_url=oa.base_url,
                              timeout_s=5),
        gemini=GeminiSettings(api_key=SecretStr(GEMINI_KEY), base_url=gm.url, timeout_s=5),
        router=RouterSettings(rate_limits=ROOMY, gemini_names="explicit"))
    with serve(create_app(settings, loader=None, chat_loader=None)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        calls: list[Callable[[], Any]] = [
            lambda: client.images.generate(model="gpt-image-1", prompt="a lighthouse",
                                           size="512x512"),
            lambda: client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]),
        ]
        for call in calls:
            with pytest.raises(openai.APIStatusError) as exc:
                call()
            assert exc.value.status_code == 502
            body = exc.value.body
            assert isinstance(body, dict)
            assert body["code"] == "upstream_error" and body["type"] == "server_error"
            assert set(body) == {"message", "type", "param", "code"}

        google = genai.Client(api_key="x", http_options=types.HttpOptions(
            base_url=base, api_version="v1beta", timeout=30_000))
        for model, modalities in (("gemini-2.5-flash-image", ["IMAGE"]),
                                  ("gemini-2.5-flash", None)):
            with pytest.raises(genai_errors.APIError) as gexc:
                google.models.generate_content(
                    model=model, contents="hello",
                    config=types.GenerateContentConfig(response_modalities=modalities))
            assert gexc.value.code == 502
            assert "Traceback" not in str(gexc.value.message)
    assert len(oa.calls) == 2 and len(gm.calls) == 2
    assert canary.calls == [] and canary.credentials_seen() == []


# ---------------------------------------------------------------- the log

def leaks(text: str, secret: str) -> list[str]:
    """The forms of ``secret`` in ``text``: its own, its disguises, or any 10-character
    run of it (or of it reversed) in any case once whitespace is squeezed out."""
    found = [name for name, form in {"exact": secret, **key_variants(secret)}.items()
             if form in text]
    squeezed = "".join(text.split()).lower()
    for form in (secret.lower(), secret[::-1].lower()):
        found += [form[i:i + 10] for i in range(len(form) - 9) if form[i:i + 10] in squeezed]
    return found


def test_no_form_of_any_key_reaches_the_log_at_debug(
        upstreams: tuple[FakeOpenAI, FakeGemini, Canary], tmp_path: Path) -> None:
    oa, gm, _ = upstreams
    for fake in (oa, gm):
        fake.reset()
        fake.echo_key = fake.echo_variants = True  # a hostile relay
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPILLWAY_PORT": str(port),
           "SPILLWAY_LOG_LEVEL": "debug", "SPILLWAY_ACCESS_LOG": "text",
           "SPILLWAY_LEDGER_URL": "sqlite://", "SPILLWAY_VLM__ENABLED": "false",
           # no weights: the local model fails to load (logged), the clouds answer
           "SPILLWAY_WEIGHTS_DIR": str(tmp_path / "no-weights"),
           "SPILLWAY_ADMIN_KEY": ADMIN_KEY,
           "SPILLWAY_OPENAI__API_KEY": OPENAI_KEY, "SPILLWAY_OPENAI__BASE_URL": oa.base_url,
           "SPILLWAY_GEMINI__API_KEY": GEMINI_KEY, "SPILLWAY_GEMINI__BASE_URL": gm.url}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([SPILLWAY, "serve"], env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=ADMIN_KEY, max_retries=0,
                               timeout=30)
        deadline = time.monotonic() + 180
        while True:  # /healthz: the local model will never be ready, the server is
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        statuses = []

        def status_of(call: Callable[[], Any]) -> int:
            try:
                call()
                return 200
            except openai.APIStatusError as exc:
                return exc.status_code

        def image(model: str) -> Callable[[], Any]:
            return lambda: client.images.generate(model=model, prompt="a lighthouse",
                                                  size="512x512")

        def chat(model: str) -> Callable[[], Any]:
            return lambda: client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hello"}])

        oa.queue_modes(["error500"])
        statuses.append(status_of(image("gpt-image-1")))
        oa.queue_modes(["auth"])
        statuses.append(status_of(chat("gpt-4o-mini")))
        statuses.append(status_of(chat("gpt-4o-mini")))  # ok; its request id is the key
        gm.queue_modes(["error500"])
        statuses.append(status_of(image("gemini-2.5-flash-image")))
        gm.queue_modes(["rate_limit"])
        statuses.append(status_of(chat("gemini-2.5-flash")))
        assert statuses == [502, 502, 200, 502, 429]
    finally:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    out = log_path.read_text(errors="replace")
    # The log is at debug, the failures were logged, and the upstreams did echo the key.
    assert " DEBUG " in out and "cloud route failed" in out and "[redacted]" in out
    assert len(oa.calls) == 3 and len(gm.calls) == 2
    for secret in (OPENAI_KEY, GEMINI_KEY, ADMIN_KEY):
        assert leaks(out, secret) == [], secret
