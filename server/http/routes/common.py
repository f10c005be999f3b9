"""What every route shares: racing the client, deadlines, and the ledger row."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from server.errors import APIError, bad_request
from server.http.auth import caller_of, reserve_quota, settle_quota
from server.routing.dispatch import Served
from server.services import AppState
from server.store.ledger import UsageRow
from server.store.quotas import Reservation

T = TypeVar("T")
DEADLINE_HEADER = "x-spillway-max-wait-ms"


class ClientGone(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Race the work against the client leaving; if it leaves, the work is cancelled
    (and with it every queued item of the request)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone


def deadline_s(request: Request, state: AppState) -> float:
    """The client's ``x-spillway-max-wait-ms``, else the configured default."""
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return state.settings.router.default_deadline_ms / 1000
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86_400_000:
        raise bad_request(f"{DEADLINE_HEADER} must be milliseconds between 0 and 86400000.",
                          param=DEADLINE_HEADER)
    return value / 1000


@dataclass
class Account:
    """Filled in by the route; written to the ledger when the request ends, however."""

    endpoint: str
    model: str
    key_name: str | None = None
    bulk: bool = False  # the caller's key runs at bulk priority
    images: int = 0
    served: Served | None = None
    status: int = 200
    outcome: str = "ok"
    started: float = field(default_factory=time.monotonic)
    key_id: str | None = None  # the caller's owner id
    reservation: Reservation | None = None  # of the key's quota, settled at the end

    @staticmethod
    def of(request: Request, endpoint: str, model: str, images: int = 0) -> Account:
        caller = caller_of(request)
        return Account(endpoint, model, caller.name, caller.bulk, images, key_id=caller.owner)


async def close_account(request: Request, state: AppState, account: Account) -> None:
    """The request's ledger row, and its quota counted as used (not reserved)."""
    if state.dispatcher is not None and (account.served or account.status != 200):
        await state.dispatcher.record(row_for(request, account))
    ok = account.outcome == "ok" and account.served is not None
    await settle_quota(state, account.reservation, account.images if ok else 0,
                       account.served.cost_usd if ok and account.served else 0.0)


@asynccontextmanager
async def accounted(request: Request, state: AppState, endpoint: str, model: str | None,
                    images: int = 0, usd_ceiling: float = 0.0) -> AsyncIterator[Account]:
    """One ledger row per request: what ran where, what it cost, or how it failed.
    The caller's quota is reserved first (``images``, and ``usd_ceiling``: the most the
    request could cost). The account is left on ``request.state`` for the access log and
    the request metrics (server/http/middleware.py)."""
    account = Account.of(request, endpoint, model or "auto", images)
    request.state.account = account
    try:
        account.reservation = await reserve_quota(state, caller_of(request), images,
                                                  usd_ceiling)
        yield account
    except APIError as err:
        account.status = err.status
        account.outcome = "rejected" if err.status in (400, 404, 413, 429) else "error"
        raise
    finally:
        await close_account(request, state, account)


def row_for(request: Request, account: Account) -> UsageRow:
    served = account.served
    ok = account.outcome == "ok"
    return UsageRow(
        endpoint=account.endpoint, model=account.model,
        route=served.route if served else "none",
        upstream_model=served.upstream_model if served else None,
        outcome=account.outcome, status=account.status,
        images=account.images if ok else 0,
        prompt_tokens=served.prompt_tokens if served else 0,
        completion_tokens=served.completion_tokens if served else 0,
        device_seconds=served.device_s if served else 0.0,
        cost_usd=served.cost_usd if served and ok else 0.0,
        cloud_equivalent_usd=served.cloud_equivalent_usd if served and ok else 0.0,
        latency_ms=(time.monotonic() - account.started) * 1000,
        queue_ms=served.queue_ms if served else 0.0,
        request_id=getattr(request.state, "request_id", None),
        key_name=account.key_name,
        key_id=account.key_id,
        reason=served.reason if served else None,
    )
