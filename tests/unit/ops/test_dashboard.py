"""The dashboard document (a pure function of ledger sums and live signals) and the
ledger's per-minute query behind it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from server.config import ImageSettings
from server.ops.dashboard import WINDOW_MINUTES, images_per_s, offered_sizes, window_start
from server.ops.dashboard import build as build_document
from server.ops.live import Cloud, Live, LocalModel
from server.store.ledger import Ledger, MinuteBucket, UsageRow

NOW = datetime(2025, 6, 15, 12, 30, 15, tzinfo=UTC)  # 15 s into the minute
GEN = "/v1/images/generations"


def live(**overrides: Any) -> Live:
    fields: dict[str, Any] = dict(
        status="ready",
        models=(LocalModel("sdxl-turbo", "images", queued=3, running=2, max_queue=256,
                           items_per_s=12.5, estimated_wait_s=0.4, items_done=40),
                LocalModel("local-vlm", "chat", queued=1, running=0, max_queue=64,
                           items_per_s=None, estimated_wait_s=1.0, items_done=0)),
        clouds=(Cloud("openai", True, "closed", 20.0), Cloud("gemini", False, "open", None)))
    fields.update(overrides)
    return Live(**fields)


def build(**fields: Any) -> dict[str, Any]:
    return build_document(limits=ImageSettings(min_side=256, max_side=1024,
                                                default_size="512x512"), **fields)


def totals(route: str, requests: int, images: int, cost: float, cloud: float
           ) -> dict[str, Any]:
    """One row of ``Ledger.totals(group_by="route")``."""
    return {"group": route, "requests": requests, "images": images, "cost_usd": cost,
            "cloud_equivalent_usd": cloud, "savings_usd": cloud - cost}


def bucket(minutes_ago: int, route: str, images: int, *, requests: int = 1,
           cost: float = 0.0, cloud: float = 0.0, latency: float = 100.0,
           errors: int = 0) -> MinuteBucket:
    minute = NOW.replace(second=0, microsecond=0) - timedelta(minutes=minutes_ago)
    return MinuteBucket(minute, route, requests, images, cost, cloud, latency, errors)


def test_today_share_cost_and_savings() -> None:
    today = [totals("local", 6, 9, 0.01, 0.36), totals("openai", 2, 3, 0.12, 0.12),
             totals("none", 1, 0, 0.0, 0.0)]
    d = build(now=NOW, today=today, buckets=[], live=live(), key=None)
    t = d["today"]
    assert (t["images"], t["local_images"], t["cloud_images"]) == (12, 9, 3)
    assert (t["requests"], t["local_requests"], t["cloud_requests"]) == (9, 6, 2)
    assert t["unrouted_requests"] == 1
    assert t["local_image_share"] == pytest.approx(0.75)
    assert t["local_request_share"] == pytest.approx(0.75)
    assert t["cost_usd"] == pytest.approx(0.13)
    assert t["cloud_equivalent_usd"] == pytest.approx(0.48)
    assert t["savings_usd"] == pytest.approx(0.35)
    assert t["start"] == "2025-06-15T00:00:00+00:00"
    clouds = {c["name"]: c for c in d["clouds"]}
    assert clouds["openai"] == {"name": "openai", "configured": True, "circuit": "closed",
                                "budget_usd": 20.0, "spent_today_usd": 0.12,
                                "kind": "openai", "tier": "standard", "requests_today": 2}
    assert clouds["gemini"]["spent_today_usd"] == 0.0 and clouds["gemini"]["circuit"] == "open"


def test_live_queues_per_model() -> None:
    d = build(now=NOW, today=[], buckets=[], live=live(), key="team-a")
    assert d["queued"] == 4 and d["key"] == "team-a" and d["status"] == "ready"
    assert [(m["model"], m["queued"], m["running"]) for m in d["local"]] == [
        ("sdxl-turbo", 3, 2), ("local-vlm", 1, 0)]
    assert d["local"][0]["items_per_s"] == 12.5 and d["local"][1]["items_per_s"] is None


def test_nothing_yet_has_no_share_and_empty_minutes() -> None:
    d = build(now=NOW, today=[], buckets=[], live=live(models=(), status="loading"),
              key=None)
    assert d["today"]["images"] == 0 and d["today"]["local_image_share"] is None
    assert d["queued"] == 0 and d["images_per_s"] == 0.0
    minutes = d["last_hour"]["minutes"]
    assert len(minutes) == WINDOW_MINUTES
    assert all(m["local_images"] == m["cloud_images"] == m["requests"] == 0 for m in minutes)
    assert all(m["mean_latency_ms"] is None for m in minutes)
    assert d["last_hour"]["mean_latency_ms"] is None


def test_minutes_fill_the_last_hour_in_order() -> None:
    buckets = [bucket(59, "local", 4, cost=0.004, cloud=0.16),
               bucket(10, "local", 5, requests=2, latency=300.0),
               bucket(10, "openai", 2, cost=0.08, cloud=0.08, latency=900.0),
               bucket(10, "none", 0, errors=1, latency=0.0),
               bucket(0, "gemini", 1, cost=0.04, cloud=0.04),
               bucket(60, "local", 99)]  # before the window: ignored
    d = build(now=NOW, today=[], buckets=buckets, live=live(), key=None)
    minutes = d["last_hour"]["minutes"]
    assert minutes[0]["t"] == "2025-06-15T11:31:00+00:00" == d["last_hour"]["start"]
    assert minutes[-1]["t"] == "2025-06-15T12:30:00+00:00"
    assert window_start(NOW).isoformat() == minutes[0]["t"]
    assert minutes[0]["local_images"] == 4 and minutes[0]["cost_usd"] == pytest.approx(0.004)
    ten = minutes[-11]
    assert (ten["local_images"], ten["cloud_images"], ten["requests"], ten["errors"]) == (
        5, 2, 4, 1)
    assert ten["mean_latency_ms"] == pytest.approx(1200 / 4)
    assert ten["cost_usd"] == pytest.approx(0.08)
    assert minutes[-1]["cloud_images"] == 1
    hour = d["last_hour"]
    assert (hour["local_images"], hour["cloud_images"], hour["errors"]) == (9, 3, 1)
    assert hour["requests"] == 6
    assert hour["savings_usd"] == pytest.approx(0.16 - 0.004)


def test_images_per_s_over_the_last_minute() -> None:
    # 15 s into the current minute: all of it, and 45/60 of the minute before.
    buckets = [bucket(1, "local", 120), bucket(0, "local", 20), bucket(0, "openai", 10)]
    d = build(now=NOW, today=[], buckets=buckets, live=live(), key=None)
    assert d["images_per_s"] == pytest.approx((30 + 120 * 0.75) / 60)
    assert images_per_s([], NOW) == 0.0


def test_offered_sizes_follow_the_servers_bounds() -> None:
    d = build(now=NOW, today=[], buckets=[], live=live(), key=None)
    assert d["playground"] == {"default_size": "512x512", "sizes": [
        "256x256", "512x512", "768x768", "1024x1024",
        "1024x768", "768x1024", "1024x576", "576x1024"]}
    small = offered_sizes(64, 512, "512x512")
    assert small[0] == "64x64" and "1024x1024" not in small and "512x512" in small
    assert offered_sizes(100, 300, "200x200")[:3] == ["200x200", "104x104", "128x128"]


# -- the ledger query behind it ---------------------------------------------------------

@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield led
    led.close()


def usage(route: str, at: datetime, images: int = 1, *, key: str | None = "alice",
          outcome: str = "ok", cost: float = 0.0, latency: float = 50.0) -> UsageRow:
    return UsageRow(GEN, "auto", route, None, outcome, 200 if outcome == "ok" else 429,
                    images=images, cost_usd=cost, cloud_equivalent_usd=0.04 * images,
                    latency_ms=latency, key_name=key, key_id=key, at=at)


def test_per_minute_groups_by_minute_and_route(ledger: Ledger) -> None:
    minute = datetime(2025, 6, 15, 12, 29, tzinfo=UTC)
    for r in [usage("local", minute + timedelta(seconds=1), 2, cost=0.001),
              usage("local", minute + timedelta(seconds=59), 3, latency=150.0),
              usage("openai", minute + timedelta(seconds=30), 1, cost=0.04),
              usage("local", minute + timedelta(minutes=1), 1, key="bob"),
              usage("none", minute + timedelta(minutes=1), 0, outcome="rejected"),
              usage("local", minute - timedelta(seconds=1), 7)]:  # before `since`
        ledger.record(r)
    got = ledger.per_minute(minute)
    assert [(b.minute.strftime("%H:%M"), b.route, b.requests, b.images, b.errors)
            for b in got] == [("12:29", "local", 2, 5, 0), ("12:29", "openai", 1, 1, 0),
                              ("12:30", "local", 1, 1, 0), ("12:30", "none", 1, 0, 1)]
    first = got[0]
    assert first.minute.tzinfo is not None and first.minute.utcoffset() == timedelta(0)
    assert first.cost_usd == pytest.approx(0.001)
    assert first.cloud_equivalent_usd == pytest.approx(0.2)
    assert first.latency_ms == pytest.approx(200.0)
    bob = ledger.per_minute(minute, only_key="bob")
    assert [(b.route, b.images) for b in bob] == [("local", 1)]
    assert ledger.per_minute(minute, until=minute + timedelta(minutes=1))[-1].route == "openai"


def test_per_minute_buckets_by_utc_whatever_the_zone_given(ledger: Ledger) -> None:
    tokyo = timezone(timedelta(hours=9))
    ledger.record(usage("local", datetime(2025, 6, 15, 21, 5, 30, tzinfo=tokyo)))
    (b,) = ledger.per_minute(datetime(2025, 6, 15, 12, 0, tzinfo=UTC))
    assert b.minute == datetime(2025, 6, 15, 12, 5, tzinfo=UTC)
