"""Prometheus metrics: one registry per app (tests run many apps in one process).

Three places feed it: the request middleware (every response, 4xx included), the
ledger path (``Dispatcher.record``: images, tokens, spills, cloud cost) and the batchers
(batch sizes, queue waits, device time). Queue depth, estimated wait and circuit state
are read from the live objects at scrape time, so they are never stale.
Labels come from bounded sets only: route templates, known model names, providers —
never key names, request ids or raw paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server import catalog
from server.ops.live import Live
from server.providers.local.batcher import BatchDone
from server.store.ledger import UsageRow

if TYPE_CHECKING:
    from server.config import Settings

__all__ = ["CONTENT_TYPE_LATEST", "Live", "Metrics", "known_models", "live_families"]

CIRCUIT = {"closed": 0, "half_open": 1, "open": 2}
OTHER = "other"  # the model label of a model name outside the known set
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def known_models(settings: Settings) -> frozenset[str]:
    """Model names that may appear as a label; any other name a client sends (the
    router accepts any ``gpt-*``) is counted as ``other``."""
    return frozenset({
        catalog.AUTO, *catalog.LOCAL_MODELS, *settings.vlm.aliases,
        settings.openai.image_model, settings.openai.vision_model,
        settings.gemini.image_model, settings.gemini.vision_model,
        *settings.router.rate_limits, *settings.prices.tokens_per_million,
        *(m for up in settings.clouds for m in up.named_models()),
    })


def model_label(model: str | None, known: frozenset[str]) -> str:
    if model is None:
        return "none"
    return model if model in known else OTHER


def live_families(live: Live) -> list[GaugeMetricFamily]:
    """The scrape-time gauges, from a snapshot of the server (pure)."""
    ready = GaugeMetricFamily("spillway_ready", "1 when every enabled model is loaded")
    ready.add_metric([], 1.0 if live.ready else 0.0)
    info = GaugeMetricFamily("spillway_model_info", "The weights each local model serves",
                             labels=["model", "weights", "source"])
    depth = GaugeMetricFamily("spillway_queue_depth", "Items waiting in the local queue",
                              labels=["model"])
    running = GaugeMetricFamily("spillway_running_items", "Items on the device now",
                                labels=["model"])
    wait = GaugeMetricFamily("spillway_estimated_wait_seconds",
                             "How long a new item would wait for the device now",
                             labels=["model"])
    for m in live.models:
        info.add_metric([m.model, m.weights, m.source], 1.0)
        depth.add_metric([m.model], m.queued)
        running.add_metric([m.model], m.running)
        wait.add_metric([m.model], m.estimated_wait_s)
    circuit = GaugeMetricFamily("spillway_circuit_state",
                                "Cloud circuit breaker: 0 closed, 1 half-open, 2 open",
                                labels=["provider"])
    for cloud in sorted(live.clouds, key=lambda c: c.name):
        if cloud.configured:
            circuit.add_metric([cloud.name], CIRCUIT[cloud.circuit])
    up = GaugeMetricFamily("spillway_worker_up", "1 while an engine worker takes work",
                           labels=["model", "worker"])
    restarts = GaugeMetricFamily("spillway_worker_restarts",
                                 "Times an engine worker was started again",
                                 labels=["model", "worker"])
    for m in live.models:
        for w in m.workers:
            up.add_metric([m.model, w.name], 1.0 if w.state == "ready" else 0.0)
            restarts.add_metric([m.model, w.name], w.restarts)
    return [ready, info, depth, running, wait, circuit, up, restarts]


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], Live]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from live_families(self._read())


class Metrics:
    """The app's metrics. Prometheus client objects are thread safe: the batcher
    threads observe directly."""

    def __init__(self, known: Iterable[str] = (), live: Callable[[], Live] | None = None,
                 process: bool = True) -> None:
        self.known = frozenset(known)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if process:
            ProcessCollector(registry=r)
        if live is not None:
            r.register(_LiveCollector(live))
        self.requests = Counter("spillway_requests", "HTTP requests answered",
                                ["endpoint", "method", "model", "route", "status"], registry=r)
        self.duration = Histogram("spillway_request_duration_seconds",
                                  "Time from request to the last byte of the response",
                                  ["endpoint", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("spillway_queue_wait_seconds",
                                    "Time an item waited in the local queue",
                                    ["model"], buckets=QUEUE_BUCKETS, registry=r)
        self.batch_size = Histogram("spillway_batch_size", "Items per device call",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.device_seconds = Counter("spillway_device_seconds",
                                      "Device time spent in pipeline calls", ["model"],
                                      registry=r)
        self.batch_failures = Counter("spillway_batch_failures", "Device calls that failed",
                                      ["model"], registry=r)
        self.images = Counter("spillway_images", "Images delivered", ["route"], registry=r)
        self.tokens = Counter("spillway_tokens", "Chat tokens", ["route", "kind"], registry=r)
        self.spills = Counter("spillway_spills", "Requests served by a cloud provider",
                              ["provider", "reason"], registry=r)
        self.cloud_cost = Counter("spillway_cloud_cost_usd", "What the cloud work cost, USD",
                                  ["provider"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- observers ---------------------------------------------------------------------
    def observe_request(self, endpoint: str, method: str, model: str | None, route: str,
                        status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, model_label(model, self.known), route,
                             str(status)).inc()
        self.duration.labels(endpoint, route).observe(seconds)

    def observe_row(self, row: UsageRow) -> None:
        """A ledger row: what was delivered, where, and what the cloud charged."""
        if row.images:
            self.images.labels(row.route).inc(row.images)
        if row.prompt_tokens:
            self.tokens.labels(row.route, "prompt").inc(row.prompt_tokens)
        if row.completion_tokens:
            self.tokens.labels(row.route, "completion").inc(row.completion_tokens)
        if row.route != "local":
            self.spills.labels(row.route, row.reason or "unknown").inc()
            self.cloud_cost.labels(row.route).inc(max(0.0, row.cost_usd))

    def observe_batch(self, done: BatchDone) -> None:
        """Called on a batcher's device thread after each pipeline call."""
        self.batch_size.labels(done.name).observe(done.size)
        self.device_seconds.labels(done.name).inc(done.device_s)
        if not done.ok:
            self.batch_failures.labels(done.name).inc()
        wait = self.queue_wait.labels(done.name)
        for seconds in done.queue_s:
            wait.observe(seconds)
