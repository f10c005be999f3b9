"""What the dashboard shows: ledger sums and live signals turned into one JSON document.

``build`` is pure: it takes today's per-route totals, the last hour's per-minute buckets
and the live snapshot (server/ops/live.py), and does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from server.config import ImageSettings
from server.ops.live import Live
from server.store.ledger import LOCAL_ROUTE, MinuteBucket

WINDOW_MINUTES = 60  # the charts: the last hour, one bar per minute
RATE_WINDOW_S = 60.0  # images/s: over the last minute
REFRESH_S = 3  # how often the page asks again
NO_ROUTE = "none"  # refused or failed before any route was chosen
SQUARE_SIDES = (64, 128, 256, 512, 768, 1024, 1536, 2048)
WIDE = ((1024, 768), (768, 1024), (1024, 576), (576, 1024))
# What the page shows of each local model (never where its weights are).
LOCAL_FIELDS = ("model", "kind", "queued", "running", "max_queue", "items_per_s",
                "estimated_wait_s", "items_done")
# What a team's key may see of a worker: not its pid nor why it failed to load (paths).
WORKER_FIELDS = ("name", "device", "state", "batches", "items", "items_per_s", "restarts")


def minute_floor(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def window_start(now: datetime) -> datetime:
    """The first minute the charts show: the current minute is the last of 60."""
    return minute_floor(now) - timedelta(minutes=WINDOW_MINUTES - 1)


def offered_sizes(min_side: int, max_side: int, default: str) -> list[str]:
    """Sizes the playground offers: common squares and a few wide/tall ones within the
    server's bounds, the smallest square allowed and the default among them."""
    smallest = -(-min_side // 8) * 8  # sides are multiples of 8
    sides = sorted({s for s in (smallest, *SQUARE_SIDES) if min_side <= s <= max_side})
    sizes = [f"{s}x{s}" for s in sides]
    sizes += [f"{w}x{h}" for w, h in WIDE if min(w, h) >= min_side and max(w, h) <= max_side]
    if default not in sizes and default != "auto":
        sizes.insert(0, default)
    return sizes


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _today(by_route: Sequence[dict[str, Any]]) -> dict[str, Any]:
    routes = {str(r["group"]): r for r in by_route}

    def total(field: str, which: Iterable[str]) -> Any:
        return sum(routes[r][field] for r in which if r in routes)

    cloud_routes = [r for r in routes if r not in (LOCAL_ROUTE, NO_ROUTE)]
    local_images = total("images", [LOCAL_ROUTE])
    cloud_images = total("images", cloud_routes)
    local_requests = total("requests", [LOCAL_ROUTE])
    cloud_requests = total("requests", cloud_routes)
    cost = total("cost_usd", routes)
    cloud_equivalent = total("cloud_equivalent_usd", routes)
    return {
        "requests": total("requests", routes),
        "images": local_images + cloud_images,
        "local_images": local_images,
        "cloud_images": cloud_images,
        "local_requests": local_requests,
        "cloud_requests": cloud_requests,
        "unrouted_requests": total("requests", [NO_ROUTE]),
        "local_image_share": _share(local_images, local_images + cloud_images),
        "local_request_share": _share(local_requests, local_requests + cloud_requests),
        "cost_usd": cost,
        "cloud_equivalent_usd": cloud_equivalent,
        "savings_usd": cloud_equivalent - cost,
    }


def _minutes(buckets: Iterable[MinuteBucket], start: datetime) -> list[dict[str, Any]]:
    """One entry per minute of the window, oldest first, empty minutes included."""
    slots: list[dict[str, Any]] = [
        {"t": (start + timedelta(minutes=i)).isoformat(), "local_images": 0,
         "cloud_images": 0, "requests": 0, "errors": 0, "cost_usd": 0.0,
         "cloud_equivalent_usd": 0.0, "mean_latency_ms": None, "_latency": 0.0}
        for i in range(WINDOW_MINUTES)]
    for b in buckets:
        i = int((b.minute - start).total_seconds() // 60)
        if not 0 <= i < WINDOW_MINUTES:
            continue
        slot = slots[i]
        if b.route == LOCAL_ROUTE:
            slot["local_images"] += b.images
        elif b.route != NO_ROUTE:
            slot["cloud_images"] += b.images
        slot["requests"] += b.requests
        slot["errors"] += b.errors
        slot["cost_usd"] += b.cost_usd
        slot["cloud_equivalent_usd"] += b.cloud_equivalent_usd
        slot["_latency"] += b.latency_ms
    for slot in slots:
        latency = slot.pop("_latency")
        if slot["requests"]:
            slot["mean_latency_ms"] = latency / slot["requests"]
    return slots


def images_per_s(minutes: Sequence[dict[str, Any]], now: datetime) -> float:
    """Images finished over the last ``RATE_WINDOW_S``: all of the current (partial)
    minute plus the part of the previous minute that falls inside the window, assuming
    the previous minute's images came evenly."""
    if not minutes:
        return 0.0
    into = (now - minute_floor(now)).total_seconds() / 60

    def images(m: dict[str, Any]) -> int:
        return int(m["local_images"] + m["cloud_images"])

    previous = images(minutes[-2]) if len(minutes) > 1 else 0
    return (images(minutes[-1]) + previous * (1 - into)) / RATE_WINDOW_S


def build(*, now: datetime, today: Sequence[dict[str, Any]],
          buckets: Iterable[MinuteBucket], live: Live, limits: ImageSettings,
          key: str | None) -> dict[str, Any]:
    """The ``GET /v1/dashboard`` document.

    ``today``: ``Ledger.totals(group_by="route")`` since UTC midnight; ``buckets``:
    ``Ledger.per_minute`` since ``window_start(now)``; both already limited to ``key``'s
    rows when a team's key asks (``key`` None: every key's).
    """
    start = window_start(now)
    minutes = _minutes(buckets, start)
    hour_requests = sum(m["requests"] for m in minutes)
    hour_latency = sum((m["mean_latency_ms"] or 0.0) * m["requests"] for m in minutes)
    hour_cost = sum(m["cost_usd"] for m in minutes)
    hour_cloud = sum(m["cloud_equivalent_usd"] for m in minutes)
    spent = {str(r["group"]): float(r["cost_usd"]) for r in today}
    requests = {str(r["group"]): int(r["requests"]) for r in today}
    return {
        "object": "dashboard",
        "now": now.isoformat(),
        "key": key,
        "status": live.status,
        "refresh_s": REFRESH_S,
        "local": [{f: getattr(m, f) for f in LOCAL_FIELDS} for m in live.models],
        # Engine worker processes (none: a model runs in the server's process).
        "workers": [{"model": m.model, **{f: getattr(w, f) for f in WORKER_FIELDS}}
                    for m in live.models for w in m.workers],
        "queued": sum(m.queued for m in live.models),
        "clouds": [{**asdict(c), "spent_today_usd": spent.get(c.name, 0.0),
                    "requests_today": requests.get(c.name, 0)} for c in live.clouds],
        "images_per_s": images_per_s(minutes, now),
        "today": {"start": now.replace(hour=0, minute=0, second=0, microsecond=0).isoformat(),
                  **_today(today)},
        "last_hour": {
            "start": start.isoformat(),
            "requests": hour_requests,
            "local_images": sum(m["local_images"] for m in minutes),
            "cloud_images": sum(m["cloud_images"] for m in minutes),
            "errors": sum(m["errors"] for m in minutes),
            "cost_usd": hour_cost,
            "cloud_equivalent_usd": hour_cloud,
            "savings_usd": hour_cloud - hour_cost,
            "mean_latency_ms": hour_latency / hour_requests if hour_requests else None,
            "minutes": minutes,
        },
        "playground": {"sizes": offered_sizes(limits.min_side, limits.max_side,
                                              limits.default_size),
                       "default_size": limits.default_size},
    }
