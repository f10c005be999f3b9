"""Per-key daily quotas, reserved before the work runs and settled when it ends.

A check ("used so far + this request <= quota") followed later by the work lets twenty
concurrent requests of a 5-image key all pass the check. Here a request *reserves* its
images (and the most it could cost) with one conditional UPDATE of the key's counter for
the UTC day, which the database applies atomically, so concurrent requests, batch items
and several server processes on one database cannot pass the quota together. When the
request ends, the reservation is replaced by what was really used (nothing, for a
failure).

The counter of a day starts from the ledger's sums for that day (a database upgraded in
the middle of a day keeps what its keys used before). A process killed between reserve
and settle leaves its reservation counted for the rest of that day: the quota errs
towards refusing, never towards overspending.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Float, Integer, String, and_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from server.ledger import Ledger

_MONEY_EPS = 1e-9


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
        self.what = what  # "images" or "usd"
        self.used = used
        self.limit = limit


def _day(now: datetime | None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d")


class Quotas:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def reserve(self, owner: str, limits: Limits, images: int, usd: float, *,
                now: datetime | None = None) -> Reservation:
        """Reserve ``images`` and ``usd`` of today's quota, or raise ``QuotaExceeded``.
        The USD quota admits a request while less than the quota is spent and the
        request's most possible cost still fits."""
        day = _day(now)
        self._ensure_day(owner, day, now)
        fits = []
        if limits.images is not None:
            fits.append(QuotaDay.images + images <= limits.images)
        if limits.usd is not None:
            fits.append(and_(QuotaDay.usd < limits.usd - _MONEY_EPS,
                             QuotaDay.usd + usd <= limits.usd + _MONEY_EPS))
        with self.ledger.writing() as s:
            res = s.execute(update(QuotaDay)
                            .where(QuotaDay.owner == owner, QuotaDay.day == day, *fits)
                            .values(images=QuotaDay.images + images, usd=QuotaDay.usd + usd)
                            .execution_options(synchronize_session=False))
            if _rowcount(res) == 1:
                return Reservation(owner, day, images, usd)
            used_images, used_usd = s.execute(
                select(QuotaDay.images, QuotaDay.usd)
                .where(QuotaDay.owner == owner, QuotaDay.day == day)).one()
        if limits.images is not None and used_images + images > limits.images:
            raise QuotaExceeded("images", used_images, limits.images)
        assert limits.usd is not None
        raise QuotaExceeded("usd", used_usd, limits.usd)

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

    def _ensure_day(self, owner: str, day: str, now: datetime | None) -> None:
        with self.ledger.writing() as s:
            if s.scalar(select(QuotaDay.owner).where(QuotaDay.owner == owner,
                                                      QuotaDay.day == day)) is not None:
                return
        images, usd = self.ledger.used_today(owner, now=now)
        try:
            with self.ledger.writing() as s:
                s.add(QuotaDay(owner=owner, day=day, images=images, usd=usd))
        except IntegrityError:
            pass  # another request (or process) made it first: same seed


def _rowcount(result: object) -> int:
    return int(result.rowcount) if isinstance(result, CursorResult) else 0

