"""/v1/chat/completions against the tiny VLM, driven by the official openai SDK."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image

from pipelines.registry import VLM, best_weights
from pipelines.vlm import ChatItem, ChatResult, VisionLanguageModel
from server.app import create_app
from server.config import Settings
from server.providers.local.batcher import BatchPolicy
from server.providers.local.chat import LocalChat
from tests.conftest import serve


def data_url(color: tuple[int, int, int], size: tuple[int, int] = (64, 48),
             fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def image_part(url: str, detail: str = "auto") -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


@pytest.fixture(scope="module")
def base_url(tiny_weights: Path) -> Iterator[str]:
    settings = Settings(weights_dir=tiny_weights)
    settings.vlm.aliases = ["gpt-4o", "gpt-4o-mini"]  # answered locally, no cloud configured
    with serve(create_app(settings)) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)


def test_one_image(client: openai.OpenAI) -> None:
    r = client.chat.completions.with_raw_response.create(
        model="local-vlm", max_tokens=12, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            image_part(data_url((255, 0, 0)))]}])
    assert r.headers["x-spillway-route"] == "local"
    c = r.parse()
    assert c.object == "chat.completion" and c.id.startswith("chatcmpl-")
    assert c.choices[0].message.role == "assistant"
    assert isinstance(c.choices[0].message.content, str)
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage is not None and 0 < c.usage.completion_tokens <= 12
    # the image expanded into its placeholder tokens: more prompt than the text alone
    text_only = client.chat.completions.create(
        model="local-vlm", max_tokens=1, temperature=0,
        messages=[{"role": "user", "content": "What is in this picture?"}])
    assert c.usage.prompt_tokens > text_only.usage.prompt_tokens  # type: ignore[union-attr]


def test_several_images_and_aliases(client: openai.OpenAI) -> None:
    one = client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Compare"}, image_part(data_url((0, 0, 255)))]}])
    three = client.chat.completions.create(
        model="gpt-4o", max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": "You compare pictures."},
                  {"role": "user", "content": [
                      {"type": "text", "text": "Compare"},
                      image_part(data_url((0, 0, 255))),
                      image_part(data_url((0, 255, 0), fmt="JPEG"), "low"),
                      image_part(data_url((9, 9, 9), (300, 20)), "high")]}])
    assert three.model == "gpt-4o"
    assert three.usage.prompt_tokens > one.usage.prompt_tokens  # type: ignore[union-attr]


def test_text_only_conversation(client: openai.OpenAI) -> None:
    c = client.chat.completions.create(
        model="local-vlm", max_completion_tokens=5, temperature=0.7, top_p=0.9, seed=3,
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hi"},
                  {"role": "user", "content": [{"type": "text", "text": "Again"}]}])
    assert c.usage is not None and c.usage.completion_tokens <= 5
    again = client.chat.completions.create(
        model="local-vlm", max_completion_tokens=5, temperature=0.7, top_p=0.9, seed=3,
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hi"},
                  {"role": "user", "content": [{"type": "text", "text": "Again"}]}])
    assert again.choices[0].message.content == c.choices[0].message.content  # same seed


def test_streaming_matches_the_plain_answer(client: openai.OpenAI) -> None:
    kw = dict(model="local-vlm", max_tokens=16, temperature=0,
              messages=[{"role": "user", "content": [
                  {"type": "text", "text": "Describe"}, image_part(data_url((1, 2, 3)))]}])
    plain = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(stream=True, **kw))  # type: ignore[call-overload]
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(ch.usage is None for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == plain.choices[0].message.content
    assert len([ch for ch in chunks if ch.choices[0].delta.content]) > 1  # it streamed


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="local-vlm", max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count"}]))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens <= 6
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_raw_stream_ends_with_done(base_url: str) -> None:
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", timeout=60, json={
            "model": "local-vlm", "stream": True, "max_tokens": 3,
            "messages": [{"role": "user", "content": "x"}]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"


BAD = [
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 10**9}, 400, "max_tokens"),
    ({"max_completion_tokens": 10**9}, 400, "max_completion_tokens"),
    ({"model": "no-such-model"}, 404, "model"),
    ({"n": 2}, 400, "n"),
    ({"temperature": 3}, 400, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400,
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [image_part("data:image/png;base64,@@@")]}]},
     400, "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url((1, 1, 1)), "detail": "ultra"}}]}]},
     400, "messages[0].content[0].image_url.detail"),
    ({"messages": [{"role": "user", "content": [image_part("file:///etc/passwd")]}]},
     400, "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [image_part("http://127.0.0.1:9/x.png")]}]},
     400, "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [image_part(data_url((1, 1, 1)))] * 9}]},
     400, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 1000}]}, 400, "messages"),
    # JSON can carry a lone surrogate (\ud800) that no tokenizer takes
    ({"messages": [{"role": "user", "content": "hi \ud800"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}],
      "stream": True}, 400, "messages[0].content[0].text"),
]


@pytest.mark.parametrize(("change", "status", "param"), BAD)
def test_bad_input(base_url: str, change: dict[str, object], status: int, param: str) -> None:
    body = {"model": "local-vlm", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}], **change}
    r = httpx.post(f"{base_url}/v1/chat/completions", content=json.dumps(body),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param


def test_context_overflow_has_openai_code(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="local-vlm", max_tokens=8,
                                       messages=[{"role": "user", "content": "x" * 3000}])
    assert exc.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def test_concurrent_requests_share_one_generate_call(tiny_weights: Path) -> None:
    info = best_weights(tiny_weights, VLM)
    assert info is not None
    model = VisionLanguageModel.load(info.path, torch.device("cpu"))
    gate, busy, calls = threading.Event(), threading.Event(), []

    def generate(items: list[ChatItem]) -> list[ChatResult]:
        busy.set()
        assert gate.wait(60)
        calls.append(len(items))
        for item in items:  # prepared at admission, not here, where that pays (chat.py)
            rgb = sum(3 * im.width * im.height for im in item.images)
            estimate = model.prompts.prepared_image_bytes(item.images)
            assert (item.prepared is not None) == (estimate is not None and estimate <= rgb)
        return model.generate(items)

    def chat_loader(s: Settings) -> LocalChat:
        return LocalChat("local-vlm", info, generate, model.prompts,
                         BatchPolicy(max_batch=16, max_wait_s=0.01), 60)

    settings = Settings(weights_dir=tiny_weights)
    with serve(create_app(settings, chat_loader=chat_loader)) as base, \
            ThreadPoolExecutor(10) as pool:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)

        def ask(i: int) -> str | None:
            return client.chat.completions.create(
                model="local-vlm", max_tokens=4, temperature=0,
                messages=[{"role": "user", "content": [
                    {"type": "text", "text": f"q{i}"},
                    image_part(data_url((i * 20, 0, 0)))]}]).choices[0].message.content

        first = pool.submit(ask, 0)
        assert busy.wait(30)
        rest = [pool.submit(ask, i) for i in range(1, 9)]
        import time
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/v1/models").json()["data"][1]["spillway"]["queued"] < 8:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        gate.set()
        answers = [first.result(), *(f.result() for f in rest)]
    assert calls == [1, 8]  # the eight that queued behind the busy model ran as one batch
    assert all(isinstance(a, str) for a in answers)


def test_streams_closed_early_leave_nothing_pending(base_url: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Twenty clients that hang up after the first piece: no task is left pending (asyncio
    logs "Task was destroyed but it is pending!" when one is collected), and the server
    still answers."""
    import gc
    import time

    caplog.set_level(logging.ERROR, logger="asyncio")
    body = {"model": "local-vlm", "stream": True, "max_tokens": 200,
            "messages": [{"role": "user", "content": "tell me a long story"}]}
    for _ in range(20):
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                          timeout=60) as r:
            assert r.status_code == 200
            next(line for line in r.iter_lines() if line.startswith("data: "))
    time.sleep(0.5)  # the server notices the hang-ups
    gc.collect()
    time.sleep(0.2)
    r = httpx.post(f"{base_url}/v1/chat/completions", timeout=60, json={
        "model": "local-vlm", "max_tokens": 2,
        "messages": [{"role": "user", "content": "still there?"}]})
    assert r.status_code == 200
    gc.collect()
    leaked = [rec.getMessage() for rec in caplog.records if "pending" in rec.getMessage()]
    assert leaked == []
