"""Who is calling: signed device requests (device_sdk.protocol) and the admin bearer token.

A device request is checked by ``authenticate_device``: the claimed id's registered key,
``verify_request`` over the *raw* request target, the nonce recorded in the database
(a primary-key conflict is a replay, atomic across workers), then the per-device rate
limit. Views use the ``device_required`` / ``admin_required`` decorators; the dashboard's
read-only views use ``admin_page_required``, which also takes HTTP Basic (for a browser)."""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import current_app, g, request
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from device_sdk.protocol import MAX_SKEW_S, ProtocolError, claimed_device_id, verify_request
from sync_server.db import Database, get_db
from sync_server.errors import ApiError
from sync_server.models import Device, Nonce, utcnow

# Nonces must outlive the whole acceptance window on both sides of now.
NONCE_TTL_S = 2 * MAX_SKEW_S
_PRUNE_EVERY_S = 60.0

F = TypeVar("F", bound=Callable[..., Any])


def request_target() -> str:
    """The path and query exactly as the client sent them: what a device signed.

    Not ``request.full_path``: it appends ``?`` when there is no query string."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if raw:
        if not raw.startswith("/"):  # absolute-form target (through a proxy)
            parts = urlsplit(raw)
            return parts.path + (f"?{parts.query}" if parts.query else "")
        return raw
    query = request.query_string.decode("latin-1")
    return request.path + (f"?{query}" if query else "")


class NonceStore:
    """Seen (device, nonce) pairs in the database, pruned after NONCE_TTL_S."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._last_prune = 0.0

    def seen(self, device_id: str, nonce: str) -> bool:
        """True when the pair was seen before; records it otherwise."""
        self._maybe_prune()
        try:
            with self._db.transaction() as session:
                session.add(Nonce(device_id=device_id, nonce=nonce, seen_at=utcnow()))
        except IntegrityError:
            return True
        return False

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < _PRUNE_EVERY_S:
            return
        self._last_prune = now
        cutoff = datetime.now(UTC) - timedelta(seconds=NONCE_TTL_S)
        with self._db.transaction() as session:
            session.execute(delete(Nonce).where(Nonce.seen_at < cutoff))


def verify_device_request(public_key: bytes | None) -> str:
    """Verify the current request as signed by ``public_key``; returns the device id."""
    nonces: NonceStore = current_app.extensions["pocketrec_nonces"]
    return verify_request(
        request.headers, request.method, request_target(), request.get_data(cache=True),
        public_key, seen_nonce=nonces.seen,
    )


def check_rate_limit(device_id: str) -> None:
    """429 ``rate_limited`` once ``device_id`` made RATE_LIMIT requests this minute (counted
    in the database: all workers share one count)."""
    wait = current_app.extensions["pocketrec_rate_limits"].device_wait(device_id)
    if wait:
        raise ApiError("rate_limited", f"too many requests from this device; retry in {wait} s",
                       429, {"Retry-After": str(wait)})


def authenticate_device() -> str:
    """Verify a request from a registered device; sets and returns ``g.device_id``."""
    db = get_db()
    device_id = claimed_device_id(request.headers)
    with db.session() as session:
        device = session.get(Device, device_id)
        public_key = None if device is None else device.public_key
    verify_device_request(public_key)
    check_rate_limit(device_id)
    with db.transaction() as session:
        seen = session.execute(update(Device).where(Device.id == device_id)
                               .values(last_seen_at=utcnow())).rowcount
    if seen != 1:  # pruned for silence (sync_server.retention) since the key was read
        raise ProtocolError("unknown_device", f"device {device_id} is not registered")
    g.device_id = device_id
    return device_id


def device_required(view: F) -> F:
    """The view runs only for a verified, registered device (``g.device_id``)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        authenticate_device()
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


BASIC_REALM = "pocketrec"


def _given_admin_secret(allow_basic: bool) -> bytes | None:
    """The secret the request offers as the admin token: a Bearer token, or (``allow_basic``)
    the password of HTTP Basic credentials (any user name). None when it offers neither."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip().encode()
    if allow_basic and scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        _user, colon, password = decoded.partition(":")
        return password.encode() if colon else None
    return None


def check_admin(*, allow_basic: bool = False) -> None:
    """Raise unless the request carries the admin token: 403 ``admin_disabled`` when none is
    configured, 401 ``unauthorized`` otherwise (with a Basic challenge when ``allow_basic``,
    so a browser asks the operator). Compared in constant time."""
    token = current_app.config["POCKETREC"]["ADMIN_TOKEN"]
    if token is None:
        raise ApiError("admin_disabled", "no ADMIN_TOKEN is configured on this server", 403)
    given = _given_admin_secret(allow_basic)
    if given is None or not hmac.compare_digest(given, token.encode()):
        if allow_basic:
            raise ApiError("unauthorized", "the dashboard needs HTTP Basic credentials (any "
                           "user name, the admin token as password) or Authorization: Bearer "
                           "<ADMIN_TOKEN>", 401,
                           {"WWW-Authenticate": f'Basic realm="{BASIC_REALM}"'})
        raise ApiError("unauthorized", "admin endpoints need Authorization: Bearer "
                       "<ADMIN_TOKEN>", 401, {"WWW-Authenticate": "Bearer"})


def admin_required(view: F) -> F:
    """The view runs only with ``Authorization: Bearer <ADMIN_TOKEN>``."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_admin()
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def admin_page_required(view: F) -> F:
    """For read-only views an operator's browser opens (the dashboard): the admin Bearer
    token, or HTTP Basic with any user name and the admin token as password; a 401 carries
    ``WWW-Authenticate: Basic realm="pocketrec"`` so the browser asks for them.

    GET views only: a browser attaches cached Basic credentials to every request to this
    origin, cross-site ones included, so accepting Basic on an endpoint that changes
    anything would expose it to cross-site request forgery. The rest of the admin API
    takes the Bearer token alone (never sent implicitly)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_admin(allow_basic=True)
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
