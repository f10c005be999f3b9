"""Per-key daily quotas, reserved before the work runs and settled when it ends.

A check ("used so far + this request <= quota") followed later by the work lets twenty
concurrent requests of a 5-image key all pass the check. Here a request *reserves* its
images (and the most it could cost, clamped to what is left) with a compare-and-set
UPDATE of the key's counter for the UTC day, which the database applies atomically, so
concurrent requests, batch items and several server processes on one database cannot
pass the quota together. When the request ends, the reservation is replaced by what was
really used (nothing, for a failure).

The counter of a day starts from the ledger's sums for that day (a database upgraded in
the middle of a day keeps what its keys used before). A process killed between reserve
and settle leaves its reservation counted for the rest of that day: the quota errs
towards refusing, never towards overspending.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Float, Integer, String, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from server.store.ledger import Ledger

_MONEY_EPS = 1e-9
_MAX_TRIES = 50


class _Base(DeclarativeBase):
    pass


class QuotaDay(_Base):
    __tablename__ = "quota_days"

    owner: Mapped[str] = mapped_column(String(40), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    images: Mapped[int] = mapped_column(Integer)  # used and reserved
    usd: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class Limits:
    images: int | None
    usd: float | None


@dataclass(frozen=True)
class Reservation:
    owner: str
    day: str
    images: int
    usd: float


class QuotaExceeded(Exception):
    def __init__(self, what: str, used: float, limit: float) -> None:
        super().__init__(f"{what}: {used} of {limit}")
        self.what = what  # "images" or "usd" ("busy": the counter never settled)
        self.used = used
        self.limit = limit


def _day(now: datetime | None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d")


class Quotas:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def reserve(self, owner: str, limits: Limits, images: int, usd: float, *,
                now: datetime | None = None) -> Reservation:
        """Reserve ``images`` and up to ``usd`` of today's quota, or raise
        ``QuotaExceeded``. Images must fit whole. Money is admitted while less than the
        quota is spent, and the reservation is the request's most possible cost clamped
        to what is left: a request that would run alone is never refused for what it
        *might* cost on a cloud (it may well run locally, for almost nothing), yet
        requests in flight together can never reserve more than the quota."""
        day = _day(now)
        # Compare-and-set on the counter row: read it, decide, write only if it is still
        # what was read. One UPDATE either way, atomic on SQLite and PostgreSQL alike;
        # a lost race re-reads.
        for _ in range(_MAX_TRIES):
            with self.ledger.writing() as s:
                row = s.execute(select(QuotaDay.images, QuotaDay.usd)
                                .where(QuotaDay.owner == owner, QuotaDay.day == day)).first()
                if row is not None:
                    used_images, used_usd = row
                    if limits.images is not None and used_images + images > limits.images:
                        raise QuotaExceeded("images", used_images, limits.images)
                    money = usd
                    if limits.usd is not None:
                        left = limits.usd - used_usd
                        if left <= _MONEY_EPS:
                            raise QuotaExceeded("usd", used_usd, limits.usd)
                        money = min(usd, left)
                    res = s.execute(update(QuotaDay)
                                    .where(QuotaDay.owner == owner, QuotaDay.day == day,
                                           QuotaDay.images == used_images,
                                           QuotaDay.usd == used_usd)
                                    .values(images=used_images + images,
                                            usd=used_usd + money)
                                    .execution_options(synchronize_session=False))
                    if _rowcount(res) == 1:
                        return Reservation(owner, day, images, money)
                    continue  # lost a race: read again
            self._start_day(owner, day, now)  # the key's first reservation of the day
        raise QuotaExceeded("busy", 0, 0)  # never seen: 50 lost races in a row

    def settle(self, r: Reservation, images: int, usd: float) -> None:
        """Replace the reservation with what the request really used."""
        with self.ledger.writing() as s:
            s.execute(update(QuotaDay).where(QuotaDay.owner == r.owner, QuotaDay.day == r.day)
                      .values(images=QuotaDay.images - r.images + images,
                              usd=QuotaDay.usd - r.usd + usd)
                      .execution_options(synchronize_session=False))

    def used(self, owner: str, *, now: datetime | None = None) -> tuple[int, float]:
        """(images, USD) used and reserved today: what the next reservation counts from."""
        day = _day(now)
        with self.ledger.writing() as s:
            row = s.execute(select(QuotaDay.images, QuotaDay.usd)
                            .where(QuotaDay.owner == owner, QuotaDay.day == day)).first()
        if row is not None:
            return int(row[0]), float(row[1])
        return self.ledger.used_today(owner, now=now)

    def _start_day(self, owner: str, day: str, now: datetime | None) -> None:
        images, usd = self.ledger.used_today(owner, now=now)
        try:
            with self.ledger.writing() as s:
                s.add(QuotaDay(owner=owner, day=day, images=images, usd=usd))
        except IntegrityError:
            pass  # another request (or process) made it first: same seed


def _rowcount(result: object) -> int:
    return int(result.rowcount) if isinstance(result, CursorResult) else 0

