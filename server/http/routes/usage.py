"""GET /v1/usage: totals over a time range, grouped by key, route, model, day or endpoint."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request

from server.errors import bad_request
from server.http.deps import State, caller_of
from server.store.ledger import GROUPS

router = APIRouter()


# Unix seconds the ledger can hold: from the epoch to the last second of year 9999
# (datetime's range). Anything else is a client's mistake, not an OverflowError.
_LAST_SECOND = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


def parse_time(value: str | None, param: str) -> datetime | None:
    """Unix seconds or an ISO date/time (UTC when no zone is given); every value that is
    neither (``inf``, ``1e400``, ``-1e20``, year 0) is a 400 naming ``param``."""
    if value in (None, ""):
        return None
    assert value is not None
    shown = value[:40]
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        if not (math.isfinite(seconds) and 0 <= seconds <= _LAST_SECOND):
            raise bad_request(f"{param} is {shown!r}: unix seconds must be between 0 and "
                              f"{_LAST_SECOND:.0f}.", param=param)
        return datetime.fromtimestamp(seconds, UTC)
    try:
        parsed = datetime.fromisoformat(value)
        # An offset at either end of datetime's range overflows once made UTC.
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise bad_request(f"{param} must be unix seconds or an ISO date, not {shown!r}.",
                          param=param) from None


@router.get("/v1/usage")
async def usage(request: Request, state: State, start: str | None = None,
                end: str | None = None, group_by: str = "route") -> dict[str, Any]:
    if group_by not in GROUPS:
        raise bad_request(f"group_by must be one of {', '.join(GROUPS)}.", param="group_by")
    since = parse_time(start, "start") or datetime.now(UTC) - timedelta(days=1)
    until = parse_time(end, "end")
    caller = caller_of(request)
    # A team's key sees its own usage; the admin key (or an open server) sees everyone's.
    only_key = caller.owner if caller.key is not None else None
    ledger = state.require_dispatcher().ledger
    rows = [] if ledger is None else await asyncio.to_thread(
        ledger.totals, since=since, until=until, group_by=group_by, only_key=only_key)
    keys = ("requests", "images", "prompt_tokens", "completion_tokens", "device_seconds",
            "cost_usd", "cloud_equivalent_usd", "savings_usd")
    total = {k: sum(r[k] for r in rows) for k in keys}
    return {"object": "list", "group_by": group_by, "start": since.isoformat(),
            "end": until.isoformat() if until else None,
            "key": caller.name if only_key else None, "data": rows, "total": total}
