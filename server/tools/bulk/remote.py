"""Against a server: rows POSTed to ``/v1/images/generations`` with ``concurrency``
requests in flight, retried on 429 / 5xx / unreachable."""

from __future__ import annotations

import base64
import queue
import random
import re
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipelines.registry import MODEL_ID
from server.tools.bulk.folder import Sink
from server.tools.bulk.rows import BulkError, Output

if TYPE_CHECKING:
    import httpx

RETRIES = 4  # after the first try: 429 / 5xx / unreachable
MAX_BACKOFF_S = 30.0


def _runs(outs: list[Output]) -> Iterator[list[Output]]:
    """Consecutive indexes of one row: one request each (seed s, s+1, ... as n)."""
    run: list[Output] = []
    for out in outs:
        if run and (out.row is not run[-1].row or out.index != run[-1].index + 1):
            yield run
            run = []
        run.append(out)
    if run:
        yield run


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_BACKOFF_S * 2)
    except ValueError:
        return None


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return response.text[:200].strip() or response.reason_phrase


def _parse_size(text: object) -> tuple[int, int] | None:
    if isinstance(text, str):
        m = re.fullmatch(r"(\d+)x(\d+)", text)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def _request(client: httpx.Client, outs: list[Output], sink: Sink,
             stop: threading.Event) -> None:
    import httpx

    row = outs[0].row
    body: dict[str, Any] = {"prompt": row.prompt, "n": len(outs), "seed": outs[0].seed,
                            "response_format": "b64_json", "output_format": row.fmt}
    for key, value in (("size", row.size), ("model", row.model), ("quality", row.quality),
                       ("steps", row.steps)):
        if value is not None:
            body[key] = value
    problem = ""
    unreachable = False
    for attempt in range(RETRIES + 1):
        started = time.perf_counter()
        delay: float | None = None
        try:
            response = client.post("/v1/images/generations", json=body)
        except httpx.TransportError as exc:
            unreachable = isinstance(exc, httpx.ConnectError)
            problem = f"cannot reach the server: {exc or type(exc).__name__}"
        else:
            unreachable = False
            if response.status_code == 200:
                _save_response(response, outs, sink, time.perf_counter() - started)
                return
            problem = f"server answered {response.status_code}: {_error_message(response)}"
            if response.status_code == 401:  # the key, not the row: every row would fail
                raise BulkError(problem)
            if response.status_code != 429 and response.status_code < 500:
                sink.fail(outs, problem)
                return
            delay = _retry_after(response)
        if attempt == RETRIES:
            break
        if delay is None:
            delay = min(MAX_BACKOFF_S, 0.5 * 2 ** attempt) * random.uniform(0.8, 1.2)
        if stop.wait(delay):
            return
    if unreachable:  # the server is gone: the rest would only wait out their retries
        raise BulkError(f"line {row.line}: gave up after {RETRIES + 1} tries: {problem}")
    sink.fail(outs, f"gave up after {RETRIES + 1} tries: {problem}")


def _save_response(response: httpx.Response, outs: list[Output], sink: Sink,
                   seconds: float) -> None:
    row = outs[0].row
    try:
        body = response.json()
        data = body["data"]
        if not isinstance(data, list) or len(data) != len(outs):
            raise ValueError(f"{len(data) if isinstance(data, list) else 'no'} image(s) "
                             f"for n={len(outs)}")
        images = [base64.b64decode(entry["b64_json"], validate=True) for entry in data]
    except (ValueError, KeyError, TypeError) as exc:
        sink.fail(outs, f"the server's answer is unusable: {exc}")
        return
    route = response.headers.get("x-spillway-route", "unknown")
    try:
        cost = float(response.headers.get("x-spillway-cost-usd", "0"))
    except ValueError:
        cost = 0.0
    size = _parse_size(body.get("size")) or (row.width or 1024, row.height or 1024)
    model = MODEL_ID if route == "local" else (row.model or route)
    for out, entry, data_bytes in zip(outs, data, images, strict=True):
        seed = entry.get("seed")
        sink.save(out, data_bytes, route=route, model=model, cost_usd=cost / len(outs),
                  latency_ms=seconds * 1000, width=size[0], height=size[1],
                  seed=seed if isinstance(seed, int) else out.seed)


def run_server(pending: list[Output], server: str, api_key: str | None, concurrency: int,
                sink: Sink) -> None:
    import httpx

    base = server.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    tasks: queue.Queue[list[Output]] = queue.Queue()
    for run in _runs(pending):
        tasks.put(run)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    stop = threading.Event()
    failure: list[BaseException] = []
    client = httpx.Client(base_url=base, headers=headers,
                          timeout=httpx.Timeout(600.0, connect=10.0),
                          limits=httpx.Limits(max_connections=concurrency,
                                              max_keepalive_connections=concurrency))

    def work() -> None:
        while not stop.is_set():
            try:
                outs = tasks.get_nowait()
            except queue.Empty:
                return
            try:
                _request(client, outs, sink, stop)
            except BulkError as exc:  # the folder, the key or the server: no use going on
                failure.append(exc)
                stop.set()
            except Exception as exc:
                if stop.is_set():
                    return
                sink.fail(outs, f"request failed: {exc}")

    try:  # any answer will do: it is there
        client.get("/healthz", timeout=10.0)
    except httpx.TransportError as exc:
        client.close()
        raise BulkError(f"cannot reach {base}: {exc or type(exc).__name__}") from exc
    threads = [threading.Thread(target=work, name=f"bulk-{i}", daemon=True)
               for i in range(min(concurrency, tasks.qsize()))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)
    finally:
        # On Ctrl-C the requests in flight are abandoned (the sink drops what they
        # bring back); their threads are daemons and end with their request.
        stop.set()
        client.close()
    if failure:
        raise failure[0]
