"""Rate limits that hold across every gunicorn worker: Flask-Limiter, counting in the
database.

Two kinds of limit, one storage:

- **Per client address**, on registration (``REGISTER_LIMIT_PER_ADDRESS``) and check-in
  (``CHECKIN_LIMIT_PER_ADDRESS``): Flask-Limiter limits on those two views, checked before
  the view runs (before the signature, the database lookups and the attestation hook), so a
  flood costs the server one counter update per request. Limit strings are ``limits``'
  notation: ``"20 per minute;200 per day"`` (every part must hold); ``"off"`` disables one.
- **Per device** (``RATE_LIMIT`` requests a minute): every signed device request, counted
  after its signature verified (``sync_server.auth``), so a forger cannot spend another
  device's budget by claiming its id.

The client address is ``REMOTE_ADDR``; behind ``TRUSTED_PROXY_HOPS`` reverse proxies it is
the address that many hops from the right of ``X-Forwarded-For`` (werkzeug's ProxyFix,
which must match the deployment exactly: one hop too many and a client picks its own
address). IPv6 clients are counted per /64 (``IPV6_PREFIX``), the block one subscriber
usually holds, so rotating through its addresses does not multiply the limit.

Storage: Flask-Limiter counts through the ``limits`` library, whose storages are memory (one
per process: a worker's count is its own), Redis, Memcached, MongoDB and other key-value
servers, but no SQL database. ``DatabaseStorage`` is that missing backend: a fixed-window
counter per key (``rate_limits``: hits, window end), bumped by one ``INSERT ... ON CONFLICT
DO UPDATE ... RETURNING`` that SQLite and PostgreSQL both execute atomically, so concurrent
workers never lose a hit. Every worker (and every host on the same database) sees the same
counts, with no further service to run. A window starts at a key's first hit and ends
``window`` seconds later; expired rows are deleted at most once a minute per process.
``RATE_LIMIT_STORAGE`` may instead name any ``limits`` storage URI (``redis://host:6379``
with the redis client installed): the same limits, counted there."""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, request
from flask_limiter import Limiter, RateLimitExceeded
from limits import RateLimitItemPerMinute
from limits.storage import Storage
from sqlalchemy import case, delete, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.middleware.proxy_fix import ProxyFix

from sync_server.db import Database
from sync_server.errors import error_response
from sync_server.models import RateLimitCounter

STORAGE_SCHEME = "pocketrec-database"
IPV6_PREFIX = 64
_PRUNE_EVERY_S = 60.0
# The views with a per-address limit: endpoint -> (setting, what a refusal says was too many).
ADDRESS_LIMITS = {
    "devices.register": ("REGISTER_LIMIT_PER_ADDRESS", "registrations"),
    "rounds.checkin": ("CHECKIN_LIMIT_PER_ADDRESS", "check-ins"),
}


class DatabaseStorage(Storage):
    """A ``limits`` storage on the app's database: fixed-window counters, one row per key."""

    STORAGE_SCHEME = [STORAGE_SCHEME]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, *,
                 db: Database, **options: Any) -> None:
        self._db = db
        self._last_prune = 0.0
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self) -> type[Exception]:
        return SQLAlchemyError

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        """Add ``amount`` hits to ``key``'s window (a new window of ``expiry`` seconds when
        none is running); returns the window's hits so far."""
        now = time.time()
        self._maybe_prune(now)
        table = RateLimitCounter.__table__
        insert = sqlite_insert if self._db.engine.dialect.name == "sqlite" else (
            postgresql_insert)
        expired = table.c.expires_at <= now
        statement = insert(table).values(key=key, hits=amount, expires_at=now + expiry)
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.key],
            set_={"hits": case((expired, amount), else_=table.c.hits + amount),
                  "expires_at": case((expired, now + expiry), else_=table.c.expires_at)},
        ).returning(table.c.hits)
        with self._db.transaction() as session:
            return int(session.execute(statement).scalar_one())

    def get(self, key: str) -> int:
        with self._db.session() as session:
            hits = session.scalar(select(RateLimitCounter.hits).where(
                RateLimitCounter.key == key, RateLimitCounter.expires_at > time.time()))
        return int(hits or 0)

    def get_expiry(self, key: str) -> float:
        """When ``key``'s window ends (epoch seconds); now when none is running."""
        now = time.time()
        with self._db.session() as session:
            ends = session.scalar(select(RateLimitCounter.expires_at).where(
                RateLimitCounter.key == key))
        return ends if ends is not None and ends > now else now

    def check(self) -> bool:
        try:
            self._db.ping()
        except SQLAlchemyError:
            return False
        return True

    def reset(self) -> int | None:
        with self._db.transaction() as session:
            count = session.scalar(select(func.count()).select_from(RateLimitCounter))
            session.execute(delete(RateLimitCounter))
        return count

    def clear(self, key: str) -> None:
        with self._db.transaction() as session:
            session.execute(delete(RateLimitCounter).where(RateLimitCounter.key == key))

    def _maybe_prune(self, now: float) -> None:
        if now - self._last_prune < _PRUNE_EVERY_S:
            return
        self._last_prune = now
        with self._db.transaction() as session:
            session.execute(delete(RateLimitCounter).where(RateLimitCounter.expires_at <= now))


def client_address() -> str:
    """The key a request is counted under: its client's IPv4 address, or its IPv6 /64."""
    raw = request.remote_addr or ""
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        # Not an address (a proxy that forwards garbage): count it under the peer that sent
        # it, so garbage cannot mint fresh keys.
        peer = request.environ.get("werkzeug.proxy_fix.orig", {}).get("REMOTE_ADDR", raw)
        return f"unparsed-from:{peer}"[:128]
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/{IPV6_PREFIX}", strict=False))
    return str(address)


class RateLimits:
    """The app's limiter (``app.extensions["pocketrec_rate_limits"]``)."""

    def __init__(self, app: Flask, db: Database, settings: Mapping[str, Any]) -> None:
        if settings["TRUSTED_PROXY_HOPS"]:
            app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings["TRUSTED_PROXY_HOPS"],
                                    x_proto=0, x_host=0, x_port=0, x_prefix=0)
        storage = settings["RATE_LIMIT_STORAGE"]
        self.limiter = Limiter(
            client_address, app=app, strategy="fixed-window", key_prefix="pocketrec",
            storage_uri=f"{STORAGE_SCHEME}://" if storage == "database" else storage,
            storage_options={"db": db} if storage == "database" else {},
        )
        self._per_device = RateLimitItemPerMinute(settings["RATE_LIMIT"])
        self._settings = settings

        @app.errorhandler(RateLimitExceeded)
        def _too_many(exc: RateLimitExceeded) -> Response:
            current = self.limiter.current_limit
            wait = _seconds_until(current.window.reset_time if current else time.time() + 60)
            return error_response("rate_limited", f"{exc.description} (at most "
                                  f"{exc.limit.limit}); retry in {wait} s", 429,
                                  {"Retry-After": str(wait)})

    def limit_views(self, app: Flask) -> None:
        """Put the per-address limits on their views (call after the blueprints are
        registered: Flask-Limiter checks a view's limit in a wrapper around it)."""
        for endpoint, (setting, what) in ADDRESS_LIMITS.items():
            value = self._settings[setting]
            if value is None:
                continue
            app.view_functions[endpoint] = self.limiter.limit(
                value, error_message=f"too many {what} from this client address")(
                app.view_functions[endpoint])

    def device_wait(self, device_id: str) -> int:
        """0 when a request of ``device_id`` may proceed (and counts it), else the seconds
        until its window ends."""
        strategy = self.limiter.limiter
        if strategy.hit(self._per_device, "device", device_id):
            return 0
        reset, _remaining = strategy.get_window_stats(self._per_device, "device", device_id)
        return _seconds_until(reset)


def _seconds_until(moment: float) -> int:
    return max(1, math.ceil(moment - time.time()))
