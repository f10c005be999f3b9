"""The engine worker's side: a child process that owns one device. It loads its model
(``EngineSpec.kind``: the SDXL pipeline, or the vision-language model), runs the batches
it is handed and answers with bytes, text and timings (server/providers/local/work.py says
what crosses). An image worker encodes its outputs itself; a VLM worker sends each
streaming row's text as it is produced, and stops a row whose client has gone.

The parent starts it with ``CUDA_VISIBLE_DEVICES`` naming its one GPU, so inside the
worker that GPU is ``cuda:0`` and no other device is ever touched.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Literal

from server.providers.local.work import (
    Answered,
    Cancel,
    Failed,
    Loaded,
    Message,
    Ran,
    RunBatch,
    RunChat,
    Stop,
    Text,
)

if TYPE_CHECKING:
    from pipelines.sdxl_turbo import SDXLTurbo
    from pipelines.vlm import VisionLanguageModel

log = logging.getLogger("spillway.engine")

POLL_S = 1.0  # how often an idle worker checks that its parent is still there


@dataclass(frozen=True)
class EngineSpec:
    """What a worker loads, as primitives (it crosses the process boundary)."""

    folder: str
    variant: str | None
    device: str  # "cpu", "cuda:1"
    xformers: bool = False
    min_side: int = 256
    max_side: int = 1024
    torch_threads: int = 1
    kind: Literal["sdxl", "vlm"] = "sdxl"  # the image pipeline, or the vision-language model
    dtype: str = "auto"  # auto, bf16, fp16, fp32 (pipelines.base.pick_dtype)
    tiny_vae: str | None = None  # TAESDXL's folder, when one is served
    fp16_vae: str | None = None  # the fp16-fix VAE's folder (used only in fp16)
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    warm_buckets: tuple[str, ...] = ()


def _one_line(exc: BaseException) -> str:
    """What the parent is told: the error's type and its first line, bounded."""
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _cuda_poisoned(exc: BaseException) -> bool:
    """After a device-side assert or an illegal access the CUDA context is unusable:
    the worker must exit and be started afresh."""
    text = str(exc)
    return "CUDA error" in text or "device-side assert" in text or "illegal memory" in text


class _Inbox:
    """The pipe, read on a thread of its own: a ``Cancel`` reaches its row while the batch
    runs on the main thread; everything else queues for the main loop, in order. When the
    server is gone (its end closed, or a new parent after kill -9) the running rows stop
    and the main loop is told to ``Stop``."""

    def __init__(self, conn: Connection, parent_pid: int) -> None:
        self.queue: queue.Queue[object] = queue.Queue()
        self._conn = conn
        self._parent_pid = parent_pid
        self._lock = threading.Lock()
        self._batch: int | None = None
        self._cancels: list[threading.Event] = []
        threading.Thread(target=self._read, daemon=True, name="engine-inbox").start()

    def running(self, batch: int | None, cancels: list[threading.Event]) -> None:
        with self._lock:
            self._batch, self._cancels = batch, cancels

    def _read(self) -> None:
        while True:
            try:
                if not self._conn.poll(POLL_S):
                    if os.getppid() != self._parent_pid:
                        break
                    continue
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(msg, Cancel):
                with self._lock:  # a Cancel for a batch already answered changes nothing
                    if msg.batch == self._batch and 0 <= msg.row < len(self._cancels):
                        self._cancels[msg.row].set()
                continue
            self.queue.put(msg)
        with self._lock:
            for cancel in self._cancels:
                cancel.set()
        self.queue.put(Stop())


def load_sdxl(spec: EngineSpec, device: str) -> tuple[SDXLTurbo, str]:
    """The image pipeline as a spec says, on ``device`` (an engine worker's, or this
    process's): loaded, tuned, its buckets compiled and warmed, its memory measured.
    Returns it and a one-line description."""
    import torch

    from pipelines.buckets import parse_buckets
    from pipelines.sdxl_turbo import Limits, SDXLTurbo

    engine = SDXLTurbo.load(spec.folder, torch.device(device), variant=spec.variant,
                            dtype=spec.dtype, xformers=spec.xformers,
                            limits=Limits(min_side=spec.min_side, max_side=spec.max_side),
                            tiny_vae=spec.tiny_vae, fp16_vae=spec.fp16_vae)
    parts = [spec.device, str(engine.dtype).removeprefix("torch."), engine.attention,
             "vae " + "+".join(engine.vaes) + (" (fp32 decode)" if engine.upcast else "")]
    buckets = parse_buckets(list(spec.warm_buckets))
    if spec.compile and buckets:
        took = engine.compile(buckets, backend=spec.compile_backend,
                              mode=None if spec.compile_mode == "default" else spec.compile_mode)
        for bucket, vae, seconds in took:
            log.info("compiled and warmed %s with the %s VAE in %.1f s", bucket, vae, seconds)
        parts.append(f"compiled {len(buckets)} buckets ({spec.compile_mode}) in "
                     f"{sum(t for _, _, t in took):.0f} s")
    if engine.device.type == "cuda":
        # The largest batch of each warmed size says how much an image of that size needs.
        largest: dict[tuple[int, int], int] = {}
        for b in buckets or parse_buckets(["512x512@4"]):
            largest[(b.width, b.height)] = max(b.batch, largest.get((b.width, b.height), 0))
        for (width, height), batch in largest.items():
            engine.measure_memory(width, height, batch)
        if engine.bytes_per_pixel:
            parts.append(f"{engine.bytes_per_pixel * 512 * 512 / 2**20:.0f} MiB per "
                         "512x512 image at peak")
    return engine, ", ".join(parts)


class _Images:
    def __init__(self, spec: EngineSpec, device: str) -> None:
        self.engine: SDXLTurbo
        self.engine, self.description = load_sdxl(spec, device)

    def run(self, msg: RunBatch) -> Ran:
        from server.providers.local.work import encode_all

        works = [w.work() for w in msg.items]
        started = time.perf_counter()
        images = encode_all(self.engine.generate([w.item for w in works]), works)
        return Ran(images, time.perf_counter() - started)


class _Chat:
    def __init__(self, spec: EngineSpec, device: str) -> None:
        import torch

        from pipelines.vlm import VisionLanguageModel

        self.model: VisionLanguageModel = VisionLanguageModel.load(spec.folder,
                                                                   torch.device(device))
        self.description = f"{spec.device}, {str(self.model.model.dtype).removeprefix('torch.')}"

    def run(self, msg: RunChat, conn: Connection, inbox: _Inbox) -> Answered:
        cancels = [threading.Event() for _ in msg.items]

        def streamer(row: int) -> Callable[[str], None]:
            def on_text(piece: str) -> None:
                _send(conn, Text(row, piece))

            return on_text

        items = [w.item(streamer(row), cancels[row]) for row, w in enumerate(msg.items)]
        started = time.perf_counter()
        inbox.running(msg.batch, cancels)
        try:
            results = self.model.generate(items)
        finally:
            inbox.running(None, [])
        return Answered(results, time.perf_counter() - started)


def _send(conn: Connection, msg: Message) -> bool:
    """False when the server is gone (the inbox sees it too, and stops the loop)."""
    try:
        conn.send(msg)
    except (OSError, ValueError):
        return False
    return True


def main(conn: Connection, spec: EngineSpec, parent_pid: int) -> None:
    # The server decides when its workers stop: Ctrl-C and SIGTERM go to the server,
    # which lets in-flight batches finish and then sends Stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    device = "cuda:0" if spec.device.startswith("cuda") else spec.device
    try:
        import torch

        if device == "cpu":
            torch.set_num_threads(max(1, spec.torch_threads))
        engine = _Chat(spec, device) if spec.kind == "vlm" else _Images(spec, device)
    except BaseException as exc:  # noqa: BLE001 - told to the parent in one sentence
        _send(conn, Failed(_one_line(exc), fatal=True))
        return
    if not _send(conn, Loaded(f"{engine.description}, pid {os.getpid()}")):
        return
    inbox = _Inbox(conn, parent_pid)
    while True:
        msg = inbox.queue.get()
        if isinstance(msg, Stop):
            return
        try:
            if isinstance(msg, RunBatch) and isinstance(engine, _Images):
                reply: Message = engine.run(msg)
            elif isinstance(msg, RunChat) and isinstance(engine, _Chat):
                reply = engine.run(msg, conn, inbox)
            else:
                continue
        except Exception as exc:  # noqa: BLE001 - the batch's requests get it
            fatal = _cuda_poisoned(exc)
            _send(conn, Failed(_one_line(exc), fatal=fatal))
            if fatal:
                return
            continue
        _send(conn, reply)
