"""``spillway bench --burst N``: N simultaneous image requests against a server with its
default queue; how long the refused ones waited for their 429, server-side, and how
/healthz answered meanwhile."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

import uvicorn

from server.app import create_app
from server.config import EngineSettings, Settings
from server.ops import access_log
from server.tools.bench import bench_settings, free_port
from server.wire.openai_images import parse_size


async def _burst_load(port: int, requests: int, body: dict[str, object]
                      ) -> tuple[list[int], list[float]]:
    """All requests at once, each whole in one write on a connection opened beforehand
    (an HTTP client library would send every request's headers, then every body, and
    the last body would arrive only after the client's own round over all of them: the
    server cannot answer before it has the request); /healthz polled every 20 ms until
    they are answered."""
    import json

    payload = json.dumps(body).encode()
    request = (f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
               "Connection: close\r\n\r\n").encode() + payload
    health_request = (f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").encode()
    health: list[float] = []

    async def status_of(reader: asyncio.StreamReader) -> int:
        line = await reader.readline()  # "HTTP/1.1 429 Too Many Requests"
        return int(line.split()[1])

    async def watch(done: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not done.is_set():
                t0 = time.perf_counter()
                writer.write(health_request)
                if await status_of(reader) != 200:
                    raise RuntimeError("/healthz failed during the burst")
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                health.append(time.perf_counter() - t0)
                await asyncio.sleep(0.02)
        finally:
            writer.close()

    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(requests)]
    done = asyncio.Event()
    watcher = asyncio.create_task(watch(done))
    await asyncio.sleep(0.1)  # the watcher's first answers come from an idle server
    for _, writer in connections:
        writer.write(request)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        try:
            return await status_of(reader)
        finally:
            writer.close()

    statuses = list(await asyncio.gather(*(answer(r, w) for r, w in connections)))
    done.set()
    await watcher
    return statuses, health


def _burst_in_process(port: int, requests: int, body: dict[str, object]
                      ) -> tuple[list[int], list[float]]:
    return asyncio.run(_burst_load(port, requests, body))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class AccessLines(logging.Handler):
    """The access log's fields of every request, while ``captured`` (and nothing printed
    meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            self.fields.append(fields)

    @contextmanager
    def captured(self) -> Iterator[None]:
        log = access_log.log
        handlers, level = list(log.handlers), log.level
        for handler in handlers:
            log.removeHandler(handler)
        log.addHandler(self)
        log.setLevel(logging.INFO)
        try:
            yield
        finally:
            log.removeHandler(self)
            for handler in handlers:
                log.addHandler(handler)
            log.setLevel(level)


def burst(settings: Settings, *, requests: int, size: str, folder: str) -> None:
    """``requests`` simultaneous image requests against a server with its default queue,
    once with the pipeline in the server's process and once in an engine worker: how long
    the refused ones waited for their 429, server-side (the access log's ``latency_ms``), and
    how /healthz answered meanwhile (client-side).

    Server-side here counts from the request's arrival in the server, as the access log
    does: the load generator opens its connections first and writes each request whole,
    so that the time measured is the server's."""
    width, height = parse_size(size, bench_settings(settings, size).images)
    body: dict[str, object] = {"prompt": "a burst", "size": f"{width}x{height}"}
    print(f"spillway bench --burst {requests}: {width}x{height}, max_queue "
          f"{settings.batch.max_queue}, all sent at once")
    print(f"{'engine':<14}{'ok':>6}{'429':>6}{'other':>7}{'429 p50 ms':>12}{'429 p99 ms':>12}"
          f"{'healthz p50':>13}{'healthz p99':>13}")
    for mode, devices in (("in-process", "inprocess"), ("1 worker", "cpu")):
        url = f"sqlite:///{folder}/burst-{devices}.db"
        s = bench_settings(settings, size).model_copy(update={
            "ledger_url": url, "engine": EngineSettings(devices=devices)})
        app = create_app(s, chat_loader=None)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        lines = AccessLines()
        try:
            while not (server.started and app.state.spillway.ready):
                time.sleep(0.05)
            with lines.captured(), ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn")) as pool:
                statuses, health = pool.submit(_burst_in_process, port, requests,
                                               body).result()
        finally:
            server.should_exit = True
            thread.join()
        refused = [f["latency_ms"] for f in lines.fields
                   if f.get("status") == 429 and f.get("path") == "/v1/images/generations"]
        ok, too_many = statuses.count(200), statuses.count(429)
        print(f"{mode:<14}{ok:>6}{too_many:>6}{len(statuses) - ok - too_many:>7}"
              f"{_pct(refused, 0.5):>12.1f}{_pct(refused, 0.99):>12.1f}"
              f"{_pct(health, 0.5) * 1000:>13.1f}{_pct(health, 0.99) * 1000:>13.1f}")
