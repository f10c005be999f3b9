"""Who asked, what it may spend, and the one ledger row every request or batch item ends
with: the accounting both the HTTP routes and the Batch API worker use.

A request's ``Account`` is made by whoever owns its lifetime (``server/http/deps.py``, the
batch worker), filled in by the serving entries (what ran where, or how it failed), and
closed once by its owner: ``close`` writes its row and counts its quota as used;
``release`` gives the quota back with no row (a batch item that will be re-run).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from server.errors import APIError
from server.job import Served
from server.retry_after import NO_RETRY, retry_headers
from server.store.keys import ADMIN_OWNER, KeyInfo
from server.store.ledger import UsageRow
from server.store.quotas import Limits, QuotaExceeded, Quotas, Reservation

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Caller:
    name: str | None  # what logs and listings show: the key's name, "admin"; None: open
    owner: str | None = None  # who owns what it makes (server/store/keys.py): never a name
    admin: bool = False
    bulk: bool = False  # the key's priority
    key: KeyInfo | None = None

    @staticmethod
    def of_key(info: KeyInfo, *, bulk: bool | None = None) -> Caller:
        return Caller(info.name, info.owner, key=info,
                      bulk=info.priority == "bulk" if bulk is None else bulk)


OPEN = Caller(None)
ADMIN = Caller(ADMIN_OWNER, ADMIN_OWNER, admin=True)


@dataclass
class Account:
    """One request's (or batch item's) ledger row in the making."""

    endpoint: str
    model: str
    caller: Caller = OPEN
    images: int = 0
    request_id: str | None = None
    origin: str | None = None  # "batch": the row's reason says so
    served: Served | None = None
    status: int = 200
    outcome: str = "ok"
    started: float = field(default_factory=time.monotonic)
    reservation: Reservation | None = None  # of the key's quota, settled at the end
    tiers: frozenset[str] | None = None  # bulk work: where it may run (a batch's metadata)

    @property
    def bulk(self) -> bool:
        return self.caller.bulk

    @property
    def ok(self) -> bool:
        return self.outcome == "ok" and self.served is not None

    def failed(self, err: APIError) -> None:
        self.status = err.status
        self.outcome = "rejected" if err.status in (400, 404, 413, 429) else "error"

    def cancelled(self) -> None:
        self.status, self.outcome = 499, "cancelled"


async def served_by(account: Account, work: Awaitable[tuple[T, Served]]) -> tuple[T, Served]:
    """Run the account's work: the account learns what served it, or how it failed, or
    that it was cancelled (the client left, the server stops)."""
    try:
        result = await work
    except APIError as err:
        account.failed(err)
        raise
    except asyncio.CancelledError:
        account.cancelled()
        raise
    account.served = result[1]
    return result


def row_for(account: Account) -> UsageRow:
    served = account.served
    ok = account.ok
    if account.origin is None:
        reason = served.reason if served else None
    else:
        reason = f"{account.origin}:{served.reason}" if served else account.origin
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
        request_id=account.request_id,
        key_name=account.caller.name,
        key_id=account.caller.owner,
        reason=reason,
    )


def quota_busy() -> APIError:
    return APIError(503, "The key's quota counter is too busy; retry.", type="server_error",
                    code="quota_busy", headers=retry_headers(1.0))


class Accounting:
    """Quota reservations and ledger rows. ``record`` writes one row (the dispatcher's,
    which also keeps today's spend and tells the observers)."""

    def __init__(self, quotas: Quotas, record: Callable[[UsageRow], Awaitable[None]]) -> None:
        self.quotas = quotas
        self.record = record

    async def reserve_by(self, account: Account, ceiling_usd: float, deadline_s: float
                         ) -> float:
        """``reserve``, then what is left of ``deadline_s`` (the reservation's database
        round trip is time the job no longer has)."""
        started = time.monotonic()
        await self.reserve(account, ceiling_usd)
        return deadline_s - (time.monotonic() - started)

    async def reserve(self, account: Account, usd: float = 0.0) -> None:
        """Reserve the account's images and up to ``usd`` of its key's daily quota before
        the work runs, or raise 429 ``insufficient_quota`` (the account says so)."""
        info = account.caller.key
        if info is None or (info.daily_images is None and info.daily_usd is None):
            # Nothing to count: no task, no await. Under a burst every hop of the event
            # loop waits behind every other request's turn, and a 429 must not.
            return
        # Shielded: a client that leaves while the counter is written (the disconnect is
        # raced around this) must not leave a reservation nobody settles.
        reserving = asyncio.ensure_future(self._reserve(info, account.images, usd))
        try:
            account.reservation = await asyncio.shield(reserving)
        except APIError as err:
            account.failed(err)
            raise
        except asyncio.CancelledError:
            account.cancelled()
            await asyncio.wait({reserving})
            if not reserving.cancelled() and reserving.exception() is None:
                account.reservation = reserving.result()
            raise

    async def _reserve(self, info: KeyInfo, images: int, usd: float) -> Reservation:
        try:
            return await asyncio.to_thread(self.quotas.reserve, info.owner,
                                           Limits(info.daily_images, info.daily_usd),
                                           images, usd)
        except QuotaExceeded as exc:
            if exc.what == "busy":
                raise quota_busy() from None
            if exc.what == "images":
                message = (f"The key {info.name!r} has used {int(exc.used)} of its "
                           f"{int(exc.limit)} images today; this request needs {images}.")
            else:
                message = (f"The key {info.name!r} has spent ${exc.used:.2f} of its "
                           f"${exc.limit:.2f} today.")
            # Until the UTC day turns, a retry meets the same answer: the SDK should not.
            raise APIError(429, message, type="insufficient_quota",
                           code="insufficient_quota", headers=NO_RETRY) from None

    async def close(self, account: Account) -> None:
        """The account's ledger row (when it ran or was refused), and its quota counted as
        used, not reserved."""
        if account.served is not None or account.status != 200:
            await self.record(row_for(account))
        served = account.served
        await self._settle(account, account.images if account.ok else 0,
                           served.cost_usd if account.ok and served else 0.0)

    async def release(self, account: Account) -> None:
        """No row, and the reservation given back: the work will run again."""
        await self._settle(account, 0, 0.0)

    async def _settle(self, account: Account, images: int, usd: float) -> None:
        """A failure here leaves the reservation counted (the quota errs towards
        refusing) and is logged."""
        reservation, account.reservation = account.reservation, None
        if reservation is None:
            return
        try:
            await asyncio.to_thread(self.quotas.settle, reservation, images, usd)
        except Exception:
            log.exception("could not settle a quota reservation of %s", reservation.owner)
