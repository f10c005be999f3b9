"""What one dashboard refresh costs the ledger on a busy day.

    .venv/bin/python -m scripts.dashboard_bench [--rows 100000,1000000]

Fills a fresh SQLite ledger (WAL, as served) with N requests spread over today (UTC, up to
now), a tenth of them in the last hour. Then, for the admin (all keys) and for one team's
key, times a full recount (today's totals by route plus the hour's per-minute buckets, the
two queries a refresh would run without ``DashboardReads``), the first read of a
``DashboardReads`` (one full query) and its next refresh after 40 more requests (about 3 s
of a 1M-a-day box). Prints the median of 5 runs of each.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session

from server.ops.dashboard import window_start
from server.ops.dashboard_reads import DashboardReads
from server.store.ledger import Ledger, UsageRecord

KEYS = ["team-a", "team-b", "team-c", "nightly"]


def fill(ledger: Ledger, rows: int, now: datetime) -> None:
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    day_s = max(60.0, (now - midnight).total_seconds())
    rng = random.Random(0)
    batch: list[UsageRecord] = []
    for i in range(rows):
        ago = rng.uniform(0, 3600) if i % 10 == 0 else rng.uniform(0, day_s)
        route = "local" if rng.random() < 0.9 else rng.choice(["openai", "gemini"])
        batch.append(UsageRecord(
            at=now - timedelta(seconds=min(ago, day_s)), endpoint="/v1/images/generations",
            model="auto", route=route, upstream_model=None, outcome="ok", status=200,
            images=rng.randint(1, 4), prompt_tokens=0, completion_tokens=0,
            device_seconds=0.05, cost_usd=0.0004, cloud_equivalent_usd=0.011,
            latency_ms=rng.uniform(80, 900), queue_ms=rng.uniform(0, 50),
            request_id=None, key_name=rng.choice(KEYS), reason="local"))
        if len(batch) == 20_000:
            with Session(ledger.engine) as s, s.begin():
                s.add_all(batch)
            batch = []
    if batch:
        with Session(ledger.engine) as s, s.begin():
            s.add_all(batch)


def median_ms(fn: object, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000")
    args = parser.parse_args()
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    print(f"{'rows today':>10}  {'who':>6}  {'recount ms':>10}  {'first read ms':>13}  "
          f"{'refresh ms':>10}")
    for rows in (int(r) for r in args.rows.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            ledger = Ledger(f"sqlite:///{Path(tmp) / 'ledger.db'}")
            fill(ledger, rows, now)
            for who, key in (("admin", None), ("team", "team-a")):
                def recount(led: Ledger = ledger, k: str | None = key) -> None:
                    led.totals(since=midnight, group_by="route", only_key=k)
                    led.per_minute(window_start(now), only_key=k)

                def first(led: Ledger = ledger, k: str | None = key) -> None:
                    DashboardReads(led).read(now, k)

                reads = DashboardReads(ledger)
                reads.read(now, key)

                def refresh(led: Ledger = ledger, k: str | None = key,
                            r: DashboardReads = reads) -> None:
                    fill(led, 40, now)
                    r.read(now, k)

                print(f"{rows:>10}  {who:>6}  {median_ms(recount):>10.1f}  "
                      f"{median_ms(first):>13.1f}  {median_ms(refresh):>10.1f}")
            ledger.close()


if __name__ == "__main__":
    main()
