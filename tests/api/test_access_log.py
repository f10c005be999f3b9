"""`spillway serve` writes one JSON line per request on stdout: who (the key's name,
never the key), what, where it ran, how long, what it cost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server.store.keys import KeyStore
from server.store.ledger import Ledger
from tests.conftest import free_port, wait_ready

SPILLWAY = str(Path(sys.executable).with_name("spillway"))
ADMIN = "admin-secret-access-log-0123456789"
WRONG = "sk-spw-not-a-real-key-0123456789"


def sdk(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def rid(value: str) -> dict[str, dict[str, str]]:
    return {"extra_headers": {"x-request-id": value}}


def test_one_json_line_per_request_with_the_key_name_never_the_key(
        tmp_path: Path, tiny_weights: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    ledger = Ledger(url)
    key = KeyStore(ledger).create("team-a")
    ledger.close()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    env = {**os.environ, "SPILLWAY_WEIGHTS_DIR": str(tiny_weights), "SPILLWAY_LEDGER_URL": url,
           "SPILLWAY_ADMIN_KEY": ADMIN, "PYTHONUNBUFFERED": "1"}
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen([SPILLWAY, "serve", "--port", str(port)], env=env,
                                stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        wait_ready(base, proc, 240, what=f"server died: {err.read_text()[-2000:]}")
        team = sdk(base, key)
        team.images.generate(prompt="a cat", size="256x256", n=2, **rid("rid-image"))
        link = team.images.generate(prompt="a dog", size="256x256", response_format="url")
        image_url = link.data[0].url if link.data else None
        assert image_url is not None
        assert httpx.get(image_url, headers={"x-request-id": "rid-fetch"}).status_code == 200
        chunks = list(team.chat.completions.create(
            model="local-vlm", max_tokens=4, stream=True, **rid("rid-stream"),
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "hello"}]))
        usage = chunks[-1].usage
        assert usage is not None
        # a client that leaves mid-stream (greedy decoding runs the tiny model to length)
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60, headers={
                "authorization": f"Bearer {key}", "x-request-id": "rid-gone"}, json={
                "model": "local-vlm", "stream": True, "max_tokens": 2000, "temperature": 0,
                "messages": [{"role": "user", "content": "count forever"}]}) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i == 3:
                    break
        with pytest.raises(openai.NotFoundError):
            team.images.generate(prompt="x", model="no-such-model", **rid("rid-404"))
        with pytest.raises(openai.AuthenticationError):
            sdk(base, WRONG).images.generate(prompt="x", **rid("rid-401"))
        minted = sdk(base, ADMIN).models.with_raw_response.list()
        minted_id = minted.headers["x-request-id"]
        assert minted_id.startswith("req_")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise

    stdout_text, stderr_text = out.read_text(), err.read_text()
    lines = [json.loads(line) for line in stdout_text.splitlines() if line.strip()]
    assert all(isinstance(line, dict) and "request_id" in line for line in lines)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_id.setdefault(line["request_id"], []).append(line)
    ours = ["rid-image", "rid-fetch", "rid-stream", "rid-gone", "rid-404", "rid-401",
            minted_id]
    assert all(len(by_id.get(r, [])) == 1 for r in ours), by_id.keys()
    image, fetch, stream, gone, missing, refused, models = (by_id[r][0] for r in ours)

    assert image["key_name"] == "team-a" and image["status"] == 200
    assert (image["method"], image["endpoint"], image["path"]) == (
        "POST", "/v1/images/generations", "/v1/images/generations")
    assert (image["route"], image["model"], image["images"]) == ("local", "auto", 2)
    assert image["latency_ms"] >= image["queue_ms"] >= 0 and image["run_ms"] >= 0
    assert image["cost_usd"] >= 0 and image["reason"]

    # a `url` image's id is its credential: the line names the route, not the id
    assert (fetch["status"], fetch["path"]) == (200, "/v1/images/{image_id}")
    assert image_url.rsplit("/", 1)[1] not in stdout_text

    assert stream["key_name"] == "team-a" and stream["status"] == 200
    assert (stream["route"], stream["model"]) == ("local", "local-vlm")
    assert stream["completion_tokens"] == usage.completion_tokens > 0
    assert stream["prompt_tokens"] == usage.prompt_tokens

    assert (gone["status"], gone["route"], gone["key_name"]) == (499, "local", "team-a")

    assert (missing["status"], missing["key_name"], missing["route"]) == (404, "team-a", "none")
    assert (refused["status"], refused["key_name"]) == (401, None)
    assert (models["status"], models["key_name"], models["endpoint"]) == (200, "admin",
                                                                        "/v1/models")
    # uvicorn's own access log is off: no second line per request
    assert '"POST /v1/images/generations HTTP' not in stdout_text + stderr_text
    for secret in (key, ADMIN, WRONG):
        assert secret not in stdout_text and secret not in stderr_text
