"""The vision-language model in an engine worker (SPILLWAY_ENGINE__VLM_DEVICES=cpu), as a
user and an operator see it: the same answers as in the server's process, text streamed
as the worker makes it, a client that leaves freeing the worker, a worker killed
mid-answer failing (or re-running) only its batch and coming back, and a bad VLM folder
reported while images go on being served."""

from __future__ import annotations

import base64
import io
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from server.app import create_app
from server.config import EngineSettings, Settings
from server.providers.local.chat import LocalChat
from tests.api.gated import wait_for
from tests.conftest import serve
from tests.e2e.test_engine_workers import gen

pytestmark = pytest.mark.e2e

# The tiny model answers "Count" at temperature 0 with ~1,900 tokens of steady text
# (seconds of work on a CPU worker): long enough to kill, or leave, in the middle.
LONG: dict[str, Any] = dict(model="local-vlm", max_tokens=1900, temperature=0,
                            messages=[{"role": "user", "content": "Count"}])
SHORT: dict[str, Any] = dict(model="local-vlm", max_tokens=4, temperature=0,
                             messages=[{"role": "user", "content": "Hi"}])
# Answers compared with the VLM in the server's process: greedy, seeded, with an image.


def data_url(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


ASKS: list[dict[str, Any]] = [
    dict(model="local-vlm", max_tokens=24, temperature=0,
         messages=[{"role": "user", "content": "Describe the sea"}]),
    dict(model="local-vlm", max_tokens=24, temperature=0.7, top_p=0.9, seed=3,
         messages=[{"role": "user", "content": "Tell me a story"}]),
    dict(model="local-vlm", max_tokens=12, temperature=0,
         messages=[{"role": "user", "content": [
             {"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": data_url((200, 30, 90))}}]}]),
]


def settings(weights: Path, vlm_devices: str, devices: str = "inprocess") -> Settings:
    return Settings(weights_dir=weights, ledger_url="sqlite://",
                    engine=EngineSettings(devices=devices, vlm_devices=vlm_devices))


def client(base: str, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=timeout)


def answer(base: str, ask: dict[str, Any]) -> str:
    return client(base).chat.completions.create(**ask).choices[0].message.content or ""


@pytest.fixture(scope="module")
def vlm_worker(tiny_weights: Path) -> Iterator[tuple[str, LocalChat]]:
    """One server for the module: chat only, its VLM in one CPU worker process."""
    app = create_app(settings(tiny_weights, "cpu"), loader=None)
    with serve(app) as base:
        local = app.state.spillway.chat
        assert local is not None
        yield base, local
    assert all(w.pid is None for w in local.workers)  # stopped with the server


@pytest.fixture(scope="module")
def long_answer(vlm_worker: tuple[str, LocalChat]) -> tuple[str, float]:
    """LONG answered whole, undisturbed, and how long that took."""
    base, _ = vlm_worker
    started = time.monotonic()
    text = answer(base, LONG)
    return text, time.monotonic() - started


def test_the_worker_answers_as_the_server_process_does(
        vlm_worker: tuple[str, LocalChat], tiny_weights: Path) -> None:
    base, local = vlm_worker
    (worker,) = local.workers
    assert worker.state == "ready" and worker.pid not in (None, os.getpid())
    from_worker = [answer(base, ask) for ask in ASKS]
    assert all(from_worker)
    with serve(create_app(settings(tiny_weights, "inprocess"), loader=None)) as alone:
        assert [answer(alone, ask) for ask in ASKS] == from_worker
    models = httpx.get(f"{base}/v1/models").json()["data"]
    (vlm,) = [m for m in models if m["id"] == "local-vlm"]
    assert [(w["name"], w["device"], w["state"]) for w in vlm["spillway"]["workers"]] == [
        ("vlm-cpu-0", "cpu", "ready")]
    assert vlm["spillway"]["workers"][0]["items"] >= len(ASKS)
    metrics = httpx.get(f"{base}/metrics").text
    assert 'spillway_worker_up{model="local-vlm",worker="vlm-cpu-0"} 1.0' in metrics


def test_streamed_text_comes_as_the_worker_makes_it(
        vlm_worker: tuple[str, LocalChat], long_answer: tuple[str, float]) -> None:
    base, _ = vlm_worker
    full, took = long_answer
    started = time.monotonic()
    first_at = None
    pieces = []
    for chunk in client(base).chat.completions.create(stream=True, **LONG):
        if chunk.choices and chunk.choices[0].delta.content:
            first_at = first_at or time.monotonic() - started
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == full
    assert len(pieces) > 10
    assert first_at is not None and first_at < took / 2  # not all at the end


def test_a_client_that_leaves_mid_stream_frees_the_worker(
        vlm_worker: tuple[str, LocalChat], long_answer: tuple[str, float]) -> None:
    """Its row stops in the worker: the next request does not wait for ~1,900 tokens."""
    base, _ = vlm_worker
    _, took = long_answer
    assert took > 1.0  # else this test shows nothing
    stream = client(base).chat.completions.create(stream=True, **LONG)
    seen = 0
    for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 2:
            break
    stream.close()
    started = time.monotonic()
    assert answer(base, SHORT)
    assert time.monotonic() - started < took / 2


def test_a_worker_killed_mid_stream_ends_it_with_an_error_and_comes_back(
        vlm_worker: tuple[str, LocalChat]) -> None:
    """Text already sent cannot be sent again: the stream ends with an error event in
    OpenAI's shape (the SDK raises it), at once; the worker is started again."""
    base, local = vlm_worker
    (worker,) = local.workers
    pid, restarts = worker.pid, worker.restarts
    assert pid is not None
    pieces = []
    started = time.monotonic()
    with pytest.raises(openai.APIError) as caught:
        for chunk in client(base, timeout=60).chat.completions.create(stream=True, **LONG):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk)
                if len(pieces) == 2:
                    os.kill(pid, signal.SIGKILL)
    assert time.monotonic() - started < 30  # never a hang
    assert isinstance(caught.value.body, dict)
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    assert caught.value.body["code"] == "pipeline_error"
    assert "died during the batch" in caught.value.body["message"]
    wait_for(lambda: worker.ready and worker.restarts == restarts + 1, timeout=120)
    assert worker.pid != pid
    assert answer(base, SHORT)
    metrics = httpx.get(f"{base}/metrics").text
    assert (f'spillway_worker_restarts{{model="local-vlm",worker="vlm-cpu-0"}} '
            f'{restarts + 1}.0') in metrics


def test_a_worker_killed_under_a_whole_answer_runs_it_again(
        vlm_worker: tuple[str, LocalChat], long_answer: tuple[str, float]) -> None:
    """Nothing was sent yet: the batch re-runs on the restarted worker, same answer."""
    base, local = vlm_worker
    (worker,) = local.workers
    full, _ = long_answer
    wait_for(lambda: worker.ready, timeout=120)
    pid = worker.pid
    assert pid is not None
    got: dict[str, str] = {}
    asking = threading.Thread(target=lambda: got.update(text=answer(base, LONG)))
    asking.start()
    wait_for(lambda: worker.busy, timeout=30)
    time.sleep(0.3)  # in the middle of it
    os.kill(pid, signal.SIGKILL)
    asking.join(180)
    assert got.get("text") == full
    assert worker.pid != pid


def test_a_bad_vlm_folder_is_reported_in_one_sentence_and_images_go_on(
        tiny_weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "sdxl-turbo-tiny").symlink_to(tiny_weights / "sdxl-turbo-tiny")
    shutil.copytree(tiny_weights / "vlm-tiny", weights / "vlm-tiny")
    for f in (weights / "vlm-tiny").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    caplog.set_level(logging.ERROR)
    app = create_app(settings(weights, "cpu"))
    with serve(app, wait_ready=False) as base:
        wait_for(lambda: httpx.get(f"{base}/readyz").json()["status"] == "failed", 180)
        assert gen(base, "still served", seed=1, n=2).status_code == 200
        said = [r.getMessage() for r in caplog.records if "could not load" in r.getMessage()]
        assert said and all("\n" not in s for s in said)
        assert "vlm-cpu-0" in said[0] and str(weights / "vlm-tiny") in said[0]
