"""The engine worker's side: a child process that owns one device. It loads its
pipeline, runs the batches it is handed, encodes the outputs itself, and answers with
bytes and timings (server/providers/local/work.py says what crosses).

The parent starts it with ``CUDA_VISIBLE_DEVICES`` naming its one GPU, so inside the
worker that GPU is ``cuda:0`` and no other device is ever touched.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from server.providers.local.work import Failed, Loaded, Ran, RunBatch, Stop

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


def _one_line(exc: BaseException) -> str:
    """What the parent is told: the error's type and its first line, bounded."""
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _cuda_poisoned(exc: BaseException) -> bool:
    """After a device-side assert or an illegal access the CUDA context is unusable:
    the worker must exit and be started afresh."""
    text = str(exc)
    return "CUDA error" in text or "device-side assert" in text or "illegal memory" in text


def main(conn: Connection, spec: EngineSpec, parent_pid: int) -> None:
    # The server decides when its workers stop: Ctrl-C and SIGTERM go to the server,
    # which lets in-flight batches finish and then sends Stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    device = "cuda:0" if spec.device.startswith("cuda") else spec.device
    try:
        import torch

        from pipelines.sdxl_turbo import Limits, SDXLTurbo
        from server.providers.local.work import encode_all

        if device == "cpu":
            torch.set_num_threads(max(1, spec.torch_threads))
        engine = SDXLTurbo.load(spec.folder, torch.device(device), variant=spec.variant,
                                xformers=spec.xformers,
                                limits=Limits(min_side=spec.min_side, max_side=spec.max_side))
    except BaseException as exc:  # noqa: BLE001 - told to the parent in one sentence
        conn.send(Failed(_one_line(exc), fatal=True))
        return
    dtype = str(engine.pipe.dtype).removeprefix("torch.")
    conn.send(Loaded(f"{spec.device}, {dtype}, {engine.attention}, pid {os.getpid()}"))
    while True:
        try:
            if not conn.poll(POLL_S):
                if os.getppid() != parent_pid:  # the server is gone (even by kill -9)
                    return
                continue
            msg = conn.recv()
        except (EOFError, OSError):  # the server closed its end: nobody to answer
            return
        if isinstance(msg, Stop):
            return
        if not isinstance(msg, RunBatch):
            continue
        works = [w.work() for w in msg.items]
        started = time.perf_counter()
        try:
            images = encode_all(engine.run([w.item for w in works]), works)
        except Exception as exc:  # noqa: BLE001 - the batch's requests get it
            fatal = _cuda_poisoned(exc)
            conn.send(Failed(_one_line(exc), fatal=fatal))
            if fatal:
                return
            continue
        conn.send(Ran(images, time.perf_counter() - started))

