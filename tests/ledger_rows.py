"""What the ledger holds, read the way an operator's SQL would: the latest rows, newest
first (the server itself only sums them)."""

from __future__ import annotations

from dataclasses import fields

from sqlalchemy import select

from server.store.ledger import Ledger, UsageRecord, UsageRow


def ledger_rows(ledger: Ledger | str, limit: int = 100) -> list[UsageRow]:
    led = Ledger(ledger) if isinstance(ledger, str) else ledger
    try:
        with led.engine.connect() as conn:
            recs = conn.execute(select(UsageRecord).order_by(
                UsageRecord.at.desc(), UsageRecord.id.desc()).limit(limit)).all()
        names = [f.name for f in fields(UsageRow)]
        return [UsageRow(**{n: getattr(r, n) for n in names}) for r in recs]
    finally:
        if isinstance(ledger, str):
            led.close()
