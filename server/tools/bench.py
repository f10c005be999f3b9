"""`spillway bench`: figures, not assertions.

``compare`` serves one loaded pipeline twice over real loopback HTTP, once behind the
batcher and once one request at a time (max_batch=1), with the same clients and load,
and prints both side by side. ``compare_workers`` does the same for where the pipeline
runs: in the server's process, and in 1..N engine worker processes. ``sweep`` times the
pipeline alone per batch size. Every table says what the server's own process spent in
CPU per image (the HTTP side, plus the pipeline when it runs in that process).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import uvicorn

from pipelines.base import ImageItem
from server import catalog
from server.app import create_app
from server.config import Settings
from server.ops import access_log
from server.providers.local.batcher import BatchPolicy
from server.providers.local.chat import LocalChat
from server.providers.local.images import LocalImages
from server.providers.local.loading import (
    batch_policy,
    load_engine,
    load_vlm,
    start_workers,
    worker_threads,
)
from server.wire.openai_images import parse_size


@dataclass(frozen=True)
class Result:
    mode: str
    images: int
    wall_s: float
    latencies_s: list[float]
    mean_batch: float
    server_cpu_s: float = 0.0  # CPU time of the server's process during the measured part

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def cpu_ms_per_image(self) -> float:
        return self.server_cpu_s * 1000 / max(1, self.images)

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bench_settings(settings: Settings, size: str) -> Settings:
    width, height = (int(v) for v in size.lower().split("x"))
    images = settings.images.model_copy(update={
        "min_side": min(settings.images.min_side, width, height),
        "max_side": max(settings.images.max_side, width, height)})
    return settings.model_copy(update={"images": images})


class _Flag(Protocol):
    def set(self) -> None: ...


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def _load(port: int, clients: int, requests: int, path: str, body: dict[str, object],
                measured: _Flag | None = None
                ) -> tuple[float, list[float]]:
    import httpx

    latencies: list[float] = []
    todo = iter(range(2 * clients))  # warm-up: connections opened, shapes measured

    async def client(http: httpx.AsyncClient) -> None:
        for _ in todo:
            t0 = time.perf_counter()
            r = await http.post(path, json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                 limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
        latencies.clear()
        todo = iter(range(requests))
        if measured is not None:
            measured.set()  # the server starts counting its CPU
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - t0, latencies


def _load_in_process(port: int, clients: int, requests: int, path: str,
                     body: dict[str, object], measured: _Flag
                     ) -> tuple[float, list[float]]:
    return asyncio.run(_load(port, clients, requests, path, body, measured))


def _run_mode(mode: str, settings: Settings, local: LocalImages | LocalChat, clients: int,
              requests: int, body: dict[str, object]) -> Result:
    port = _free_port()
    if isinstance(local, LocalImages):
        app, path = create_app(settings, loader=lambda _: local, chat_loader=None), \
            "/v1/images/generations"
    else:
        app, path = create_app(settings, loader=None, chat_loader=lambda _: local), \
            "/v1/chat/completions"
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        # The clients run in their own process, as real clients do: they do not take the
        # server's interpreter lock.
        spawn = multiprocessing.get_context("spawn")
        with spawn.Manager() as manager, ProcessPoolExecutor(1, mp_context=spawn) as pool:
            measured = manager.Event()
            done = pool.submit(_load_in_process, port, clients, requests, path, body,
                               measured)
            while not measured.wait(0.05) and not done.done():
                pass
            before, cpu0 = local.batcher.snapshot(), _cpu_s()
            wall, latencies = done.result()
            after, cpu = local.batcher.snapshot(), _cpu_s() - cpu0
    finally:
        server.should_exit = True
        thread.join()
    warm_batches = after.batches - before.batches
    mean_batch = (after.items_done - before.items_done) / max(1, warm_batches)
    return Result(mode, requests, wall, latencies, mean_batch, cpu)


def compare(settings: Settings, *, clients: int, requests: int, size: str, steps: int) -> None:
    settings = _bench_settings(settings, size)
    width, height = parse_size(size, settings.images)
    engine, weights = load_engine(settings)
    body: dict[str, object] = {"prompt": "a red bicycle", "size": f"{width}x{height}",
                               "steps": steps, "response_format": "b64_json"}
    modes = [("batched", batch_policy(settings)),
             ("one-at-a-time", BatchPolicy(max_batch=1, max_queue=settings.batch.max_queue))]
    results = []
    for mode, policy in modes:
        local = LocalImages(catalog.IMAGE_MODEL, weights, engine.text2img, policy,
                            settings.batch.default_timeout_s)
        results.append(_run_mode(mode, settings, local, clients, requests, body))
    print(f"spillway bench: {weights.label} on {engine.device.type} "
          f"({str(engine.pipe.dtype).removeprefix('torch.')}, {engine.attention}), "
          f"{width}x{height}, {steps} step(s), {clients} clients, {requests} requests per mode, "
          f"torch threads {torch.get_num_threads()}")
    _table(results, "images/s")


def _table(results: list[Result], unit: str, ratio: bool = True) -> None:
    print(f"{'mode':<15}{unit:>12}{'p50 ms':>10}{'p95 ms':>10}{'mean batch':>12}"
          f"{'server CPU ms/' + unit.split('/')[0][:-1]:>22}")
    for r in results:
        print(f"{r.mode:<15}{r.images_per_s:>12.1f}{r.pct(0.5):>10.0f}{r.pct(0.95):>10.0f}"
              f"{r.mean_batch:>12.1f}{r.cpu_ms_per_image:>22.1f}")
    if ratio:
        print(f"batched / one-at-a-time: "
              f"{results[0].images_per_s / results[1].images_per_s:.2f}x {unit}")


def compare_workers(settings: Settings, *, clients: int, requests: int, size: str,
                    steps: int, workers: int) -> None:
    """The same batched load with the pipeline in the server's process, then in 1..N
    engine worker processes (one per CUDA device when there are any, else on the CPU)."""
    settings = _bench_settings(settings, size)
    width, height = parse_size(size, settings.images)
    body: dict[str, object] = {"prompt": "a red bicycle", "size": f"{width}x{height}",
                               "steps": steps, "response_format": "b64_json"}
    engine, weights = load_engine(settings)
    threads = torch.get_num_threads()
    local = LocalImages(catalog.IMAGE_MODEL, weights, engine.run, batch_policy(settings),
                        settings.batch.default_timeout_s)
    results = [_run_mode("in-process", settings, local, clients, requests, body)]
    del engine, local
    cuda = torch.cuda.device_count()
    counts = sorted({1, workers})
    for n in counts:
        devices = [f"cuda:{i}" for i in range(n)] if cuda >= n else ["cpu"] * n
        pool = start_workers(settings, devices)
        name = f"{n} worker" + ("s" if n > 1 else "")
        results.append(_run_mode(name, settings, pool, clients, requests, body))
    print(f"spillway bench --workers {workers}: {weights.label}, {width}x{height}, "
          f"{steps} step(s), {clients} clients, {requests} requests per mode; torch threads: "
          f"{threads} in-process, {worker_threads(settings, workers)} per CPU worker at "
          f"{workers}")
    _table(results, "images/s", ratio=False)
    base = results[0].images_per_s
    print("vs in-process: " + ", ".join(f"{r.mode} {r.images_per_s / base:.2f}x"
                                        for r in results[1:]))


def compare_chat(settings: Settings, *, clients: int, requests: int, max_tokens: int,
                 image_side: int = 512) -> None:
    """Vision chat: one image (a photo-sized noise PNG) and a question per request."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    model, weights = load_vlm(settings)
    noise = np.random.default_rng(0).integers(0, 256, (image_side, image_side, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body: dict[str, object] = {
        "model": catalog.VLM_MODEL, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Describe this image."},
            {"type": "image_url", "image_url": {"url": url}}]}]}
    v = settings.vlm
    modes = [("batched", v.max_batch), ("one-at-a-time", 1)]
    results = []
    for mode, max_batch in modes:
        policy = BatchPolicy(max_batch=max_batch, max_batch_pixels=2**62,
                             max_wait_s=v.max_wait_ms / 1000, max_queue=v.max_queue)
        local = LocalChat(catalog.VLM_MODEL, weights, model.generate,
                          lambda item: model.count_prompt_tokens(item.messages, item.images),
                          model.context_length, policy, v.timeout_s)
        results.append(_run_mode(mode, settings, local, clients, requests, body))
    print(f"spillway bench --chat: {weights.label} on {model.device.type} "
          f"({str(model.model.dtype).removeprefix('torch.')}), {image_side}x{image_side} image, "
          f"up to {max_tokens} output tokens, {clients} clients, {requests} requests per mode, "
          f"torch threads {torch.get_num_threads()}")
    _table(results, "requests/s")


def sweep(settings: Settings, batch_sizes: list[int], size: str, steps: int,
          repeats: int = 5) -> None:
    """The pipeline alone (no HTTP), one call per batch, median of ``repeats`` calls."""
    settings = _bench_settings(settings, size)
    width, height = parse_size(size, settings.images)
    engine, weights = load_engine(settings)
    cuda = engine.device.type == "cuda"
    name = torch.cuda.get_device_name(engine.device) if cuda else "cpu"
    print(f"spillway bench --sweep: {weights.label} on {name} "
          f"({str(engine.pipe.dtype).removeprefix('torch.')}, {engine.attention}), "
          f"{width}x{height}, {steps} step(s), median of {repeats}")
    print(f"{'batch':>6}{'ms/batch':>11}{'images/s':>10}")
    for b in batch_sizes:
        items = [ImageItem(f"prompt {i}", i, width, height, steps) for i in range(b)]
        engine.text2img(items)  # warm-up: kernels chosen, memory allocated
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.text2img(items)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"{b:>6}{med * 1000:>11.1f}{b / med:>10.1f}")


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


class _AccessLines(logging.Handler):
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
    from server.config import EngineSettings

    width, height = parse_size(size, _bench_settings(settings, size).images)
    body: dict[str, object] = {"prompt": "a burst", "size": f"{width}x{height}"}
    print(f"spillway bench --burst {requests}: {width}x{height}, max_queue "
          f"{settings.batch.max_queue}, all sent at once")
    print(f"{'engine':<14}{'ok':>6}{'429':>6}{'other':>7}{'429 p50 ms':>12}{'429 p99 ms':>12}"
          f"{'healthz p50':>13}{'healthz p99':>13}")
    for mode, devices in (("in-process", "inprocess"), ("1 worker", "cpu")):
        url = f"sqlite:///{folder}/burst-{devices}.db"
        s = _bench_settings(settings, size).model_copy(update={
            "ledger_url": url, "engine": EngineSettings(devices=devices)})
        app = create_app(s, chat_loader=None)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        lines = _AccessLines()
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
