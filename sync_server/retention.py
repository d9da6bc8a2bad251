"""How long the server keeps what it stores about devices, and the sweep that enforces it.

Two rules (settings in days; 0 keeps forever):

- ``ROUND_RECORD_RETENTION_DAYS`` (default 30): a round that ended (published or failed)
  that many days ago loses its per-device rows: selection coins, selections, update records
  (device, examples, norm, size: the update blobs themselves went when the round ended) and
  SecAgg+ membership and relayed shares. The round itself, its counts, measurements and
  ledger row, and every model version, stay: the epsilon composes over all rounds ever run.
- ``DEVICE_RETENTION_DAYS`` (default 180): a registered device not seen (no verified
  request) for that many days is deleted, once no round record still names it (so no rule
  shortens another's). Its key is then unknown: its next request gets 401
  ``unknown_device`` and it must register again (the SDK's DeviceClient does so by itself),
  through the per-address limit, the enrollment token (a one-time token re-registers the
  key it was used for) and the attestation hook like any new device.

Kept for as long as the deployment: rounds, the privacy ledger, model versions and their
metrics, one-time enrollment token digests (with the device id a used one registered).
Short-lived by their own rules: request nonces (10 minutes, ``sync_server.auth``) and
rate-limit counters (their window, ``sync_server.rate_limit``).

The sweep runs in every worker at its first request and then every ``RETENTION_SWEEP_S``
(default 3600) seconds, after a response has been sent (in a thread of its own), and on
demand through ``POST /v1/admin/retention/sweep``. It only deletes rows past their
retention, so workers sweeping at once, or a sweep repeated, change nothing more."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, select

from sync_server.db import Database
from sync_server.models import (
    Device,
    Round,
    SecAggMember,
    SecAggShare,
    Selection,
    SelectionCoin,
    Update,
    utcnow,
)

log = logging.getLogger(__name__)

ENDED = ("published", "failed")
# Per-device rows of a round, each keyed by (round_id, ...); the ones naming a device id.
ROUND_ROWS = (SelectionCoin, Selection, Update, SecAggMember, SecAggShare)
DEVICE_ROWS = (SelectionCoin, Selection, Update, SecAggMember)


class Retention:
    """The app's retention rules (``app.extensions["pocketrec_retention"]``)."""

    def __init__(self, db: Database, settings: Mapping[str, Any]) -> None:
        self.db = db
        self.device_days = int(settings["DEVICE_RETENTION_DAYS"])
        self.round_record_days = int(settings["ROUND_RECORD_RETENTION_DAYS"])
        self.every_s = float(settings["RETENTION_SWEEP_S"])
        self._next = 0.0  # monotonic time of this process's next automatic sweep
        self._lock = threading.Lock()

    def policy(self) -> dict[str, int]:
        return {"device_retention_days": self.device_days,
                "round_record_retention_days": self.round_record_days}

    def due(self) -> bool:
        """True once per RETENTION_SWEEP_S in this process (the caller then sweeps)."""
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                return False
            self._next = now + self.every_s
            return True

    def sweep(self, now: datetime | None = None) -> dict[str, int]:
        """Delete what is past its retention; returns how many rows of each kind went."""
        now = now or utcnow()
        pruned: dict[str, int] = {}
        if self.round_record_days:
            cutoff = now - timedelta(days=self.round_record_days)
            old = select(Round.id).where(Round.state.in_(ENDED), Round.finished_at < cutoff)
            with self.db.transaction() as session:
                for model in ROUND_ROWS:
                    pruned[model.__tablename__] = session.execute(
                        delete(model).where(model.round_id.in_(old))).rowcount
        if self.device_days:
            cutoff = now - timedelta(days=self.device_days)
            unnamed = [~exists().where(model.device_id == Device.id) for model in DEVICE_ROWS]
            # One statement: a device that made a request meanwhile is no longer silent
            # (its last_seen_at moved before any row could name it), so it stays.
            with self.db.transaction() as session:
                pruned["devices"] = session.execute(delete(Device).where(
                    Device.last_seen_at < cutoff, *unnamed)).rowcount
        if any(pruned.values()):
            log.info("retention sweep: %s", pruned, extra={"pruned": pruned})
        return pruned
