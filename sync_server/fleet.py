"""The fleet as the operator sees it: devices registered, devices seen in the last day, and
the model version each device reported at its latest check-in (what a round's selection
rests on: only devices holding the round's base version get a coin).

Anyone can register a key, so ``registered`` says nothing about real users; ``seen_last_day``
and the versions show what the fleet actually does."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from sync_server.db import Database
from sync_server.models import Device, utcnow

SEEN_WINDOW = timedelta(days=1)
MAX_VERSION = 2**31 - 1


def note_version(db: Database, device_id: str, version: int | None) -> None:
    """Remember the version a device reported at check-in (no write when unchanged). A
    number no version can have (negative, or past the INTEGER column) is stored as none."""
    if version is not None and not 0 <= version <= MAX_VERSION:
        version = None
    with db.transaction() as session:
        session.execute(update(Device).where(
            Device.id == device_id, Device.model_version.is_distinct_from(version))
            .values(model_version=version))


def summary(session: Any, now: datetime | None = None) -> dict[str, Any]:
    """{registered, seen_last_day, by_version: {"<version>" | "none": devices seen in the
    last day that reported it}}."""
    since = (now or utcnow()) - SEEN_WINDOW
    registered = session.scalar(select(func.count()).select_from(Device)) or 0
    rows = session.execute(select(Device.model_version, func.count())
                           .where(Device.last_seen_at >= since)
                           .group_by(Device.model_version)).all()
    by_version = {("none" if v is None else str(v)): n for v, n in sorted(
        rows, key=lambda r: (r[0] is None, r[0] or 0))}
    return {"registered": registered, "seen_last_day": sum(by_version.values()),
            "by_version": by_version}
