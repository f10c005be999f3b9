"""One snapshot of the running server: the local models and their queues, the clouds and
their circuits, and whether it is ready. ``/readyz``, ``/v1/models``, the metrics scrape
and the dashboard all read this one, so they never disagree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from server.providers.local.chat import LocalChat
from server.providers.local.engine import EngineWorker
from server.providers.local.images import LocalImages
from server.routing.dispatch import Dispatcher

Status = Literal["ready", "loading", "failed"]


@dataclass(frozen=True)
class Worker:
    """One engine worker process of a local model (the image model's or the VLM's)."""

    name: str
    device: str
    state: str  # starting | ready | restarting | failed | stopped
    pid: int | None
    batches: int
    items: int
    items_per_s: float | None  # while it had work
    restarts: int
    load_error: str | None = None


@dataclass(frozen=True)
class LocalModel:
    """One local model as its batcher reports it (cheap reads under its lock)."""

    model: str
    kind: str  # "images" | "chat"
    queued: int  # items waiting for the device
    running: int  # items on the device now
    max_queue: int
    items_per_s: float | None  # the batcher's measured throughput (EWMA), None until measured
    estimated_wait_s: float  # until the queue drains
    items_done: int
    weights: str = ""  # which weights: their label
    source: str = ""  # "hub", "random-full", "tiny"
    engine: str = ""  # device, dtype, attention
    path: Path | None = None  # where the weights are: the operator's business only
    workers: tuple[Worker, ...] = ()  # engine worker processes; none: in the server's process


@dataclass(frozen=True)
class Cloud:
    name: str  # the upstream's
    configured: bool
    circuit: str  # "closed" | "open" | "half_open"
    budget_usd: float | None  # today's budget for this upstream, if any
    kind: str = "openai"  # openai, azure, openai-compatible, gemini, anthropic
    tier: str = "standard"


@dataclass(frozen=True)
class Live:
    status: Status
    models: tuple[LocalModel, ...] = ()
    clouds: tuple[Cloud, ...] = ()

    @property
    def ready(self) -> bool:
        return self.status == "ready"


def worker_view(w: EngineWorker) -> Worker:
    return Worker(w.name, w.spec.device, w.state, w.pid, w.batches, w.items,
                  w.items / w.busy_s if w.busy_s > 0 else None, w.restarts, w.load_error)


def local_model(kind: str, local: LocalImages | LocalChat) -> LocalModel:
    batcher = local.batcher
    workers: list[EngineWorker] = list(local.workers)
    snap = batcher.snapshot()
    return LocalModel(model=local.model_id, kind=kind, queued=snap.queued,
                      running=snap.running, max_queue=batcher.policy.max_queue,
                      items_per_s=snap.items_per_s,
                      estimated_wait_s=batcher.estimated_wait([]),
                      items_done=snap.items_done, weights=local.weights.label,
                      source=local.weights.source, engine=local.description,
                      path=local.weights.path,
                      workers=tuple(worker_view(w) for w in workers))


def read_live(status: Status, images: LocalImages | None, chat: LocalChat | None,
              dispatcher: Dispatcher | None) -> Live:
    models = tuple(local_model(kind, local) for kind, local in
                   (("images", images), ("chat", chat)) if local is not None)
    clouds = () if dispatcher is None else tuple(
        Cloud(name, name in dispatcher.providers, dispatcher.breakers[name].state,
              dispatcher.settings.budget(up), up.kind, up.tier)
        for name, up in dispatcher.upstreams.items())
    return Live(status, models, clouds)
