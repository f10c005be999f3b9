"""The Batch API in-process (tiny models, a SQLite ledger on disk), driven by the official
openai SDK: upload, create, poll, download the output and error files."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai.types import Batch
from PIL import Image
from pydantic import SecretStr

from server.app import create_app
from server.batches.service import BatchService
from server.batches.validate import item_seed
from server.config import BatchSettings, Settings
from server.routing.dispatch import Dispatcher
from server.serving import Serving
from server.store.keys import KeyStore
from server.store.ledger import Ledger
from server.store.quotas import Quotas
from tests.conftest import serve
from tests.ledger_rows import ledger_rows

TERMINAL = {"completed", "failed", "cancelled", "expired"}


@pytest.fixture(scope="module")
def app(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    tmp = tmp_path_factory.mktemp("batches")
    settings = Settings(weights_dir=tiny_weights, ledger_url=f"sqlite:///{tmp}/l.db")
    return create_app(settings)


@pytest.fixture(scope="module")
def base_url(app: FastAPI) -> Iterator[str]:
    with serve(app) as url:
        yield url


@pytest.fixture
def batch_service(app: FastAPI, base_url: str) -> BatchService:
    """The running server's BatchService (its limits are read at each request)."""
    service: BatchService | None = app.state.spillway.batches
    assert service is not None
    return service


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)


def jsonl(lines: list[Any]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def gen_line(custom_id: str, prompt: str, size: str = "256x256", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/images/generations",
            "body": {"prompt": prompt, "size": size, **body}}


def submit(client: openai.OpenAI, lines: list[Any], endpoint: str = "/v1/images/generations",
           **kw: Any) -> Batch:
    f = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(jsonl(lines)) and f.id.startswith("file-")
    batch = client.batches.create(input_file_id=f.id, endpoint=endpoint,  # type: ignore[arg-type]
                                  completion_window="24h", **kw)
    assert batch.status == "validating" and batch.input_file_id == f.id
    return batch


def wait(client: openai.OpenAI, batch_id: str, timeout: float = 60) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.05)


def completed(client: openai.OpenAI, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    return counts.completed if counts else 0


def wait_for_progress(client: openai.OpenAI, batch_id: str, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while completed(client, batch_id) < at_least:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def image_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def data_url(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_images_batch_completes(client: openai.OpenAI) -> None:
    sizes = ["256x256", "320x256", "256x384"]
    lines = [gen_line(f"req-{i}", f"a lighthouse number {i}", sizes[i % 3]) for i in range(12)]
    lines[5]["body"]["seed"] = 1234
    lines[7]["body"]["n"] = 2
    batch = submit(client, lines, metadata={"job": "nightly"})
    done = wait(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (12, 12, 0)
    assert done.metadata == {"job": "nightly"}
    assert done.error_file_id is None and done.output_file_id is not None
    assert None not in (done.in_progress_at, done.finalizing_at, done.completed_at)
    out = client.files.retrieve(done.output_file_id)
    assert out.purpose == "batch_output" and out.bytes > 0
    results = lines_of(client, done.output_file_id)
    assert [r["custom_id"] for r in results] == [f"req-{i}" for i in range(12)]  # line order
    for i, r in enumerate(results):
        assert r["id"].startswith("batch_req_") and r["error"] is None
        assert r["response"]["status_code"] == 200 and r["response"]["request_id"]
        body = r["response"]["body"]
        assert len(body["data"]) == (2 if i == 7 else 1)
        w, h = (int(v) for v in sizes[i % 3].split("x"))
        for d in body["data"]:
            assert image_size(d["b64_json"]) == (w, h)
        assert body["size"] == sizes[i % 3]
    assert results[5]["response"]["body"]["data"][0]["seed"] == 1234
    # items without a seed got one from (batch, custom_id): stable across re-runs
    assert results[0]["response"]["body"]["data"][0]["seed"] == item_seed(batch.id, "req-0")
    # files can be deleted once read; the batch keeps its ids
    assert client.files.delete(done.output_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(done.output_file_id)


def test_chat_batch_with_a_data_url_image(client: openai.OpenAI) -> None:
    lines = [{"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "local-vlm", "max_tokens": 4, "temperature": 0,
                       "messages": [{"role": "user", "content": [
                           {"type": "text", "text": f"What colour is picture {i}?"},
                           {"type": "image_url",
                            "image_url": {"url": data_url((40 * i, 0, 200))}}]}]}}
             for i in range(3)]
    done = wait(client, submit(client, lines, endpoint="/v1/chat/completions").id)
    assert done.status == "completed", done
    results = lines_of(client, done.output_file_id)
    assert [r["custom_id"] for r in results] == ["chat-0", "chat-1", "chat-2"]
    for r in results:
        body = r["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "local-vlm"
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert 0 < body["usage"]["completion_tokens"] <= 4


def test_edits_batch_takes_image_urls(client: openai.OpenAI) -> None:
    lines = [{"custom_id": f"edit-{i}", "method": "POST", "url": "/v1/images/edits",
              "body": {"prompt": "make it blue", "size": "256x256",
                       "images": [{"image_url": data_url((200, 30 * i, 0), (300, 200))}]}}
             for i in range(2)]
    done = wait(client, submit(client, lines, endpoint="/v1/images/edits").id)
    assert done.status == "completed", lines_of(client, done.error_file_id)
    for r in lines_of(client, done.output_file_id):
        assert image_size(r["response"]["body"]["data"][0]["b64_json"]) == (256, 256)


def test_bad_lines_go_to_the_error_file_and_the_rest_run(client: openai.OpenAI) -> None:
    lines: list[Any] = [
        gen_line("ok-1", "a boat"),                                           # 1
        "{this is not json",                                                  # 2
        {**gen_line("wrong-url", "x"), "url": "/v1/chat/completions"},        # 3
        gen_line("bad-size", "x", size="13x13"),                              # 4
        gen_line("ok-1", "the same custom_id again"),                         # 5
        {"method": "POST", "url": "/v1/images/generations", "body": {"prompt": "x"}},  # 6
        {**gen_line("get", "x"), "method": "GET"},                            # 7
        gen_line("no-prompt", ""),                                            # 8
        "",                                                                   # 9 (blank)
        gen_line("ok-2", "a train", n=11),                                    # 10: n > 10
        gen_line("ok-3", "a train"),                                          # 11
    ]
    done = wait(client, submit(client, lines).id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (10, 2, 8)
    assert [r["custom_id"] for r in lines_of(client, done.output_file_id)] == ["ok-1", "ok-3"]
    errors = lines_of(client, done.error_file_id)
    by_line = {int(e["error"]["message"].split(":")[0].removeprefix("line ")): e
               for e in errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 10]  # in input order, blank line skipped
    assert [int(e["error"]["message"].split(":")[0][5:]) for e in errors] == sorted(by_line)
    for e in errors:
        assert e["response"] is None and e["id"].startswith("batch_req_")
        assert set(e) == {"id", "custom_id", "response", "error"}
    assert by_line[2]["custom_id"] is None and by_line[2]["error"]["code"] == "invalid_json_line"
    assert by_line[3]["custom_id"] == "wrong-url" and by_line[3]["error"]["code"] == "invalid_url"
    assert "size" in by_line[4]["error"]["message"]
    assert by_line[5]["error"]["code"] == "duplicate_custom_id"
    assert "line 1" in by_line[5]["error"]["message"]
    assert by_line[6]["custom_id"] is None
    assert by_line[6]["error"]["code"] == "missing_custom_id"
    assert by_line[7]["error"]["code"] == "invalid_method"
    assert by_line[8]["error"]["code"] == "invalid_value"
    assert "prompt" in by_line[8]["error"]["message"]
    assert by_line[10]["custom_id"] == "ok-2" and "'n'" in by_line[10]["error"]["message"]


def test_a_batch_with_only_bad_lines_fails(client: openai.OpenAI) -> None:
    done = wait(client, submit(client, ["not json", gen_line("a", "x", size="1x1")]).id)
    assert done.status == "failed" and done.failed_at is not None
    assert done.errors is not None and done.errors.data is not None
    assert [(e.line, e.code) for e in done.errors.data] == [(1, "invalid_json_line"),
                                                            (2, "invalid_value")]
    assert done.output_file_id is None
    assert len(lines_of(client, done.error_file_id)) == 2


def _error_shape(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_refusals_in_the_openai_shape(client: openai.OpenAI, base_url: str,
                                      batch_service: BatchService,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    one = jsonl([gen_line("a", "x")])
    with pytest.raises(openai.BadRequestError) as purpose:
        client.files.create(file=("x.jsonl", one), purpose="fine-tune")
    assert _error_shape(purpose.value)["param"] == "purpose"
    monkeypatch.setattr(batch_service.files, "max_lines", 3)
    with pytest.raises(openai.BadRequestError) as lines:
        client.files.create(file=("x.jsonl", jsonl([gen_line(str(i), "x") for i in range(4)])),
                            purpose="batch")
    assert _error_shape(lines.value)["code"] == "too_many_lines"
    monkeypatch.setattr(batch_service.files, "max_bytes", 100)
    with pytest.raises(openai.BadRequestError) as big:
        client.files.create(file=("x.jsonl", b"x" * 101), purpose="batch")
    assert _error_shape(big.value)["code"] == "file_too_large"
    monkeypatch.undo()
    with pytest.raises(openai.NotFoundError) as missing:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/images/generations",
                              completion_window="24h")
    assert _error_shape(missing.value)["param"] == "input_file_id"
    f = client.files.create(file=("x.jsonl", one), purpose="batch")
    with pytest.raises(openai.BadRequestError) as endpoint:
        client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                              completion_window="24h")
    assert _error_shape(endpoint.value)["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as window:
        client.batches.create(input_file_id=f.id, endpoint="/v1/images/generations",
                              completion_window="48h")  # type: ignore[arg-type]
    assert _error_shape(window.value)["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-nope")
    r = httpx.post(f"{base_url}/v1/files", json={"purpose": "batch"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param",
                                                              "code"}


def test_cancel_reports_unrun_requests(client: openai.OpenAI) -> None:
    lines = [gen_line(f"c-{i}", f"a slow one {i}", "512x512") for i in range(20)]
    batch = submit(client, lines)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    done = wait(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    out = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    ids = [r["custom_id"] for r in out + errors]
    assert sorted(ids) == sorted(f"c-{i}" for i in range(20))  # each exactly once
    cancelled = [e for e in errors if e["error"] and e["error"]["code"] == "batch_cancelled"]
    assert cancelled and all(e["response"] is None for e in cancelled)
    assert done.request_counts is not None
    assert done.request_counts.completed == len(out)
    assert done.request_counts.failed == len(errors)
    with pytest.raises(openai.BadRequestError):  # a finished batch cannot be cancelled
        client.batches.cancel(wait(client, submit(client, [gen_line("z", "z")]).id).id)


def test_list_batches_pages(client: openai.OpenAI) -> None:
    made = [submit(client, [gen_line("p", f"page {i}")]).id for i in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2]  # newest first
    assert first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == made[0]
    every = [b.id for b in client.batches.list(limit=2)]  # the SDK follows the pages
    assert every[:3] == made[::-1] and len(every) == len(set(every))
    for batch_id in made:
        wait(client, batch_id)


def test_interactive_requests_go_first(client: openai.OpenAI) -> None:
    lines = [gen_line(f"bg-{i}", f"background work {i}", "384x384") for i in range(30)]
    batch = submit(client, lines)
    wait_for_progress(client, batch.id, 1)

    def interactive() -> float:
        t0 = time.monotonic()
        r = client.images.generate(prompt="now, please", size="256x256",
                                   response_format="b64_json")
        assert image_size(r.data[0].b64_json or "") == (256, 256)  # type: ignore[index]
        return time.monotonic() - t0

    with ThreadPoolExecutor(2) as pool:
        took = list(pool.map(lambda _: interactive(), range(2)))
    with pytest.raises(openai.BadRequestError):  # the input of a running batch stays
        client.files.delete(batch.input_file_id)
    during = client.batches.retrieve(batch.id)
    assert during.status == "in_progress", "the batch ended before the interactive requests"
    assert during.request_counts is not None and during.request_counts.completed < 30
    assert max(took) < 10
    done = wait(client, batch.id, timeout=120)
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.completed == 30


def test_an_expired_batch_reports_every_request(client: openai.OpenAI,
                                                batch_service: BatchService,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # over as soon as it starts
    monkeypatch.setattr(batch_service, "completion_windows", {"24h": 0})
    done = wait(client, submit(client, [gen_line(f"e-{i}", "late") for i in range(3)]).id)
    assert done.status == "expired" and done.expired_at is not None
    errors = lines_of(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["e-0", "e-1", "e-2"]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}


def test_stop_leaves_pending_work_for_the_next_start(tiny_weights: Path,
                                                     tmp_path: Path) -> None:
    settings = Settings(weights_dir=tiny_weights, ledger_url=f"sqlite:///{tmp_path}/l.db")
    lines = [gen_line(f"s-{i}", f"stop and go {i}", "384x384") for i in range(24)]
    with serve(create_app(settings, chat_loader=None)) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        batch = submit(c, lines)
        wait_for_progress(c, batch.id, 2)
    # a graceful stop: in-flight items finished, the rest wait, nothing is half-done
    with sqlite3.connect(tmp_path / "l.db") as db:
        states = dict(db.execute("SELECT state, count(*) FROM batch_items GROUP BY state"))
        lease = db.execute("SELECT count(*) FROM batch_worker_lease").fetchone()[0]
    assert "sending" not in states and states.get("pending", 0) > 0, states
    assert lease == 0  # handed back: the next start need not wait for it to go stale
    with serve(create_app(settings, chat_loader=None)) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        done = wait(c, batch.id)
        assert done.status == "completed" and done.request_counts is not None
        assert done.request_counts.completed == 24
        assert [r["custom_id"] for r in lines_of(c, done.output_file_id)] == \
            [f"s-{i}" for i in range(24)]


def test_one_worker_per_database(tiny_weights: Path, tmp_path: Path) -> None:
    settings = Settings(weights_dir=tiny_weights, ledger_url=f"sqlite:///{tmp_path}/l.db")

    def service() -> BatchService:
        ledger = Ledger(settings.ledger_url)
        serving = Serving.build(settings, Dispatcher(settings, {}, ledger), Quotas(ledger),
                                None, chat_enabled=False)
        return BatchService(settings, serving, KeyStore(ledger), lambda: False)

    a, b = service(), service()
    assert a.lease.acquire() and not b.lease.acquire()
    assert a.lease.acquire()  # still a's
    with sqlite3.connect(tmp_path / "l.db") as db:  # a's process died (a pid that is gone)
        db.execute("UPDATE batch_worker_lease SET pid = ?", (dead_pid(),))
    assert b.lease.acquire() and not a.lease.heartbeat()
    b.lease.release()
    assert a.lease.acquire()
    for svc in (a, b):
        svc.engine.dispose()


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_files_list_pages_orders_and_filters(client: openai.OpenAI) -> None:
    made = {client.files.create(file=(f"f{i}.jsonl", jsonl([gen_line(str(i), "x")])),
                                purpose="batch").id for i in range(3)}
    newest_first = client.files.list(purpose="batch").data
    assert made <= {f.id for f in newest_first}
    stamps = [f.created_at for f in newest_first]
    assert stamps == sorted(stamps, reverse=True)
    # oldest first is the same list backwards (ties in a second broken the same way)
    assert [f.id for f in client.files.list(purpose="batch", order="asc")] == \
        [f.id for f in reversed(newest_first)]
    page = client.files.list(purpose="batch", limit=2)
    assert len(page.data) == 2 and page.has_more
    rest = client.files.list(purpose="batch", limit=2, after=page.data[-1].id)
    assert [f.id for f in [*page.data, *rest.data]] == [f.id for f in newest_first][:4]
    # the SDK's auto-pagination walks every page
    assert [f.id for f in client.files.list(purpose="batch", limit=1)] == \
        [f.id for f in newest_first]
    assert client.files.list(purpose="fine-tune").data == []
    gone = next(iter(made))
    client.files.delete(gone)
    assert gone not in {f.id for f in client.files.list()}
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.list(order="sideways")  # type: ignore[arg-type]
    assert _error_shape(exc.value)["param"] == "order"
    with pytest.raises(openai.NotFoundError):
        client.files.list(after="file-nope")


def test_batches_belong_to_their_key(tiny_weights: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    admin_key = "admin-secret-for-batch-tests-0123"
    store = KeyStore(Ledger(url))
    key_a, key_b = store.create("team-a"), store.create("team-b")
    settings = Settings(weights_dir=tiny_weights, ledger_url=url,
                        admin_key=SecretStr(admin_key))

    def sdk(base: str, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)

    with serve(create_app(settings, chat_loader=None)) as base:
        a, b, admin = sdk(base, key_a), sdk(base, key_b), sdk(base, admin_key)
        with pytest.raises(openai.AuthenticationError):
            sdk(base, "not-a-key").batches.list()
        done = wait(a, submit(a, [gen_line("mine", "team a's picture")]).id)
        assert done.status == "completed" and done.output_file_id is not None
        with pytest.raises(openai.NotFoundError):
            b.batches.retrieve(done.id)
        with pytest.raises(openai.NotFoundError):
            b.files.content(done.output_file_id)
        with pytest.raises(openai.NotFoundError):
            b.batches.cancel(done.id)
        assert done.id not in [x.id for x in b.batches.list()]
        assert done.id in [x.id for x in a.batches.list()]
        assert admin.batches.retrieve(done.id).status == "completed"
        # files.list shows a key its own files only (the admin key: everyone's)
        mine = {f.id for f in a.files.list()}
        assert {done.input_file_id, done.output_file_id} <= mine
        assert not mine & {f.id for f in b.files.list()}
        assert mine <= {f.id for f in admin.files.list()}
    rows = ledger_rows(url)  # the item is accounted to the key that made the batch
    assert [(r.key_name, r.route, r.images) for r in rows
            if r.endpoint == "/v1/images/generations"] == [("team-a", "local", 1)]


def test_a_full_queue_delays_items_but_does_not_fail_them(tiny_weights: Path,
                                                          tmp_path: Path) -> None:
    # 4 items of 4 images in flight against a local queue of 10: some meet a 429
    settings = Settings(weights_dir=tiny_weights, ledger_url=f"sqlite:///{tmp_path}/l.db",
                        batch=BatchSettings(max_queue=10, warmup=False))
    lines = [gen_line(f"q-{i}", f"crowded {i}", n=4) for i in range(8)]
    with serve(create_app(settings, chat_loader=None)) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        done = wait(c, submit(c, lines).id, timeout=90)
        assert done.status == "completed", lines_of(c, done.error_file_id)
        out = lines_of(c, done.output_file_id)
        assert [len(r["response"]["body"]["data"]) for r in out] == [4] * 8
    with sqlite3.connect(tmp_path / "l.db") as db:
        retried = db.execute("SELECT count(*) FROM batch_items WHERE attempts > 0").fetchone()[0]
    assert retried > 0  # the queue really was full, and the items waited their turn
