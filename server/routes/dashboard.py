"""GET /v1/dashboard: the numbers behind the web page's dashboard, as JSON."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request

from server import dashboard
from server.auth import caller_of
from server.ledger import Ledger, MinuteBucket
from server.state import State

router = APIRouter()


def _read(ledger: Ledger | None, now: datetime, only_key: str | None
          ) -> tuple[list[dict[str, Any]], list[MinuteBucket]]:
    if ledger is None:
        return [], []
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    today = ledger.totals(since=midnight, group_by="route", only_key=only_key)
    buckets = ledger.per_minute(dashboard.window_start(now), only_key=only_key)
    return today, buckets


@router.get("/v1/dashboard")
async def get_dashboard(request: Request, state: State) -> dict[str, Any]:
    caller = caller_of(request)
    # As /v1/usage: a team's key sees its own rows; the admin key (or an open server) all.
    only_key = caller.name if caller.key is not None else None
    now = datetime.now(UTC)
    live = dashboard.read_live(state)
    today, buckets = await asyncio.to_thread(
        _read, state.require_dispatcher().ledger, now, only_key)
    return dashboard.build(now=now, today=today, buckets=buckets, live=live, key=only_key)
