"""GET /v1/dashboard: the numbers behind the web page's dashboard, as JSON."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request

from server.http.deps import State, caller_of
from server.ops import dashboard
from server.ops.dashboard_reads import DashboardReads
from server.services import AppState

router = APIRouter()


def _reads(state: AppState) -> DashboardReads | None:
    ledger = state.require_dispatcher().ledger
    if ledger is None:
        return None
    if state.dashboard_reads is None or state.dashboard_reads.ledger is not ledger:
        state.dashboard_reads = DashboardReads(ledger)
    return state.dashboard_reads


@router.get("/v1/dashboard")
async def get_dashboard(request: Request, state: State) -> dict[str, Any]:
    caller = caller_of(request)
    # As /v1/usage: a team's key sees its own rows; the admin key (or an open server) all.
    only_key = caller.owner if caller.key is not None else None
    now = datetime.now(UTC)
    live = state.live()
    reads = _reads(state)
    today, buckets = ([], []) if reads is None else await asyncio.to_thread(
        reads.read, now, only_key)
    return dashboard.build(now=now, today=today, buckets=buckets, live=live,
                           limits=state.settings.images, key=caller.name if only_key else None)
