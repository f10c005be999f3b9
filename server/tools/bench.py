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
import multiprocessing
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch
import uvicorn

from pipelines.base import ImageItem
from server import catalog
from server.app import create_app
from server.config import Settings
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_settings(settings: Settings, size: str) -> Settings:
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
    port = free_port()
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
    settings = bench_settings(settings, size)
    width, height = parse_size(size, settings.images)
    engine, weights = load_engine(settings)
    body: dict[str, object] = {"prompt": "a red bicycle", "size": f"{width}x{height}",
                               "steps": steps, "response_format": "b64_json"}
    modes = [("batched", batch_policy(settings)),
             ("one-at-a-time", BatchPolicy(max_batch=1, max_queue=settings.batch.max_queue))]
    results = []
    for mode, policy in modes:
        local = LocalImages(catalog.IMAGE_MODEL, weights, engine.generate, policy,
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
    settings = bench_settings(settings, size)
    width, height = parse_size(size, settings.images)
    body: dict[str, object] = {"prompt": "a red bicycle", "size": f"{width}x{height}",
                               "steps": steps, "response_format": "b64_json"}
    engine, weights = load_engine(settings)
    threads = torch.get_num_threads()
    local = LocalImages(catalog.IMAGE_MODEL, weights, engine.generate, batch_policy(settings),
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
        local = LocalChat(catalog.VLM_MODEL, weights, model.generate, model.prompts, policy,
                          v.timeout_s)
        results.append(_run_mode(mode, settings, local, clients, requests, body))
    print(f"spillway bench --chat: {weights.label} on {model.device.type} "
          f"({str(model.model.dtype).removeprefix('torch.')}), {image_side}x{image_side} image, "
          f"up to {max_tokens} output tokens, {clients} clients, {requests} requests per mode, "
          f"torch threads {torch.get_num_threads()}")
    _table(results, "requests/s")


def sweep(settings: Settings, batch_sizes: list[int], size: str, steps: int,
          repeats: int = 5) -> None:
    """The pipeline alone (no HTTP), one call per batch, median of ``repeats`` calls."""
    settings = bench_settings(settings, size)
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
