"""Batches survive a killed server: a real `spillway serve` process is SIGKILLed mid-batch
and started again on the same database; the batch completes, every custom_id lands exactly
once in the output or error file, and no request reaches a cloud provider twice."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from tests.conftest import free_port, wait_ready
from tests.fakes.openai_server import running_fake_openai

SPILLWAY = str(Path(sys.executable).with_name("spillway"))
pytestmark = pytest.mark.e2e


@contextmanager
def spillway(tmp_path: Path, weights: Path, extra: dict[str, str] | None = None
             ) -> Iterator[Callable[[], tuple[subprocess.Popen[bytes], openai.OpenAI]]]:
    """Yields ``start()``: a fresh server process on the same database each call."""
    db = tmp_path / "l.db"
    env = {**os.environ, "SPILLWAY_WEIGHTS_DIR": str(weights),
           "SPILLWAY_LEDGER_URL": f"sqlite:///{db}", "SPILLWAY_VLM__ENABLED": "false",
           "PYTHONUNBUFFERED": "1", **(extra or {})}
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[subprocess.Popen[bytes], openai.OpenAI]:
        port = free_port()
        log = (tmp_path / f"server-{len(procs)}.log").open("wb")
        proc = subprocess.Popen([SPILLWAY, "serve", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0, timeout=30)
        wait_ready(f"http://127.0.0.1:{port}", proc, 120, log.name)
        return proc, client

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)  # reaped: the next server sees the lease holder's pid gone


def item_states(tmp_path: Path) -> dict[str, tuple[str, str | None]]:
    """custom_id -> (state, upstream provider) as the killed server left them."""
    with sqlite3.connect(tmp_path / "l.db") as db:
        rows = db.execute("SELECT custom_id, state, upstream_provider FROM batch_items")
        return {cid: (state, provider) for cid, state, provider in rows}


def submit(client: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    f = client.files.create(file=("in.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/images/generations",
                                 completion_window="24h").id


def completed(client: openai.OpenAI, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    return counts.completed if counts else 0


def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def results(client: openai.OpenAI, batch_id: str, timeout: float = 120
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    wait_until(lambda: client.batches.retrieve(batch_id).status == "completed", timeout)
    batch = client.batches.retrieve(batch_id)

    def lines(file_id: str | None) -> list[dict[str, Any]]:
        if file_id is None:
            return []
        return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]

    return lines(batch.output_file_id), lines(batch.error_file_id)


def test_local_batch_survives_kill_9(tmp_path: Path, tiny_weights: Path) -> None:
    lines = [{"custom_id": f"img-{i}", "method": "POST", "url": "/v1/images/generations",
              "body": {"prompt": f"a lighthouse at dusk, take {i}", "size": "256x256"}}
             for i in range(40)]
    with spillway(tmp_path, tiny_weights) as start:
        proc, client = start()
        batch_id = submit(client, lines)
        wait_until(lambda: completed(client, batch_id) >= 10, 60)
        kill(proc)
        left = item_states(tmp_path)
        done_at_kill = sum(state == "done" for state, _ in left.values())
        assert 10 <= done_at_kill < 40, "the batch was not interrupted"
        proc, client = start()
        out, errors = results(client, batch_id)
    ids = [r["custom_id"] for r in out + errors]
    assert Counter(ids) == Counter(f"img-{i}" for i in range(40))  # each exactly once
    assert errors == []  # local work re-runs from its seed: nothing is lost
    assert [r["custom_id"] for r in out] == [f"img-{i}" for i in range(40)]
    for r in out:
        assert r["response"]["status_code"] == 200
        raw = base64.b64decode(r["response"]["body"]["data"][0]["b64_json"])
        image = Image.open(io.BytesIO(raw))
        image.load()
        assert image.size == (256, 256)


def test_cloud_requests_are_never_sent_twice(tmp_path: Path, tiny_weights: Path) -> None:
    n = 20
    lines = [{"custom_id": f"cloud-{i}", "method": "POST", "url": "/v1/images/generations",
              "body": {"model": "gpt-image-1", "prompt": f"unique prompt number {i}",
                       "size": "256x256"}} for i in range(n)]
    with running_fake_openai() as fake:
        fake.latency_s = 1.0
        extra = {"SPILLWAY_OPENAI__API_KEY": "sk-test-durability-0123456789",
                 "SPILLWAY_OPENAI__BASE_URL": f"{fake.url}/v1",
                 "SPILLWAY_ROUTER__RATE_LIMITS":
                     '{"gpt-image-1": {"per_minute": 10000, "burst": 10000}}'}
        with spillway(tmp_path, tiny_weights, extra) as start:
            proc, client = start()
            batch_id = submit(client, lines)
            wait_until(lambda: completed(client, batch_id) >= 4, 60)
            time.sleep(0.3)  # the next requests are out at the fake (1 s each)
            kill(proc)
            left = item_states(tmp_path)
            proc, client = start()
            out, errors = results(client, batch_id)
        prompts = Counter(c.body["prompt"] for c in fake.calls_to("/images/generations"))
    assert prompts and max(prompts.values()) == 1, prompts  # nothing sent twice
    ids = [r["custom_id"] for r in out + errors]
    assert Counter(ids) == Counter(f"cloud-{i}" for i in range(n))  # each exactly once
    # exactly the requests that were out at the fake when the server died are "unknown"
    were_out = {cid for cid, (state, provider) in left.items()
                if state == "sending" and provider == "openai"}
    assert 1 <= len(were_out) <= 4, left
    assert {e["custom_id"] for e in errors} == were_out
    for e in errors:
        assert e["response"] is None and e["error"]["code"] == "upstream_outcome_unknown"
    # every answered request was sent exactly once, and came back from the fake
    for r in out:
        i = int(r["custom_id"].split("-")[1])
        assert prompts[f"unique prompt number {i}"] == 1
        raw = base64.b64decode(r["response"]["body"]["data"][0]["b64_json"])
        assert Image.open(io.BytesIO(raw)).size == (256, 256)
