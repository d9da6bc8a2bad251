"""One-time enrollment tokens (``ENROLLMENT_MODE = "one-time"``): the app's backend asks the
admin API for tokens (``POST /v1/admin/enrollment-tokens``) and hands one to each install;
a token registers exactly one device key. Only the tokens' SHA-256 digests are stored, so
a database leak does not hand out registrations.

This bounds how many keys anyone can register to how many tokens the backend issued: the
selection coin already keeps fake keys from moving epsilon or taking a round's slots, and
the tokens keep them from crowding rounds at all. Attestation (a platform's proof that the
install is genuine) plugs in where the backend decides whom to give a token to."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import update

from sync_server.db import Database
from sync_server.errors import ApiError
from sync_server.models import Device, EnrollmentToken, utcnow

MAX_BATCH = 1000


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def mint(db: Database, count: int) -> list[str]:
    """``count`` fresh tokens (32 random bytes each, URL-safe); only digests are stored."""
    tokens = [secrets.token_urlsafe(32) for _ in range(count)]
    with db.transaction() as session:
        session.add_all(EnrollmentToken(token_sha256=digest(t)) for t in tokens)
    return tokens


def register_with_token(db: Database, device_id: str, public_key: bytes, token: object
                        ) -> bool:
    """Register ``device_id`` by consuming ``token``, in one transaction; True when the
    device was already registered with this very token (a retry). A device pruned for
    silence registers again with the token it first used. 403
    ``enrollment_refused`` for a missing, unknown or already used token."""
    refused = ApiError("enrollment_refused", "registration needs an unused one-time "
                       "enrollment token from the app's backend", 403)
    if not isinstance(token, str) or not token:
        raise refused
    key = digest(token)
    with db.transaction() as session:
        row = session.get(EnrollmentToken, key)
        if row is None:
            raise refused
        if row.used_at is not None:
            if row.device_id != device_id:
                raise refused
            if session.get(Device, device_id) is not None:
                return True
            # The key this token registered was pruned after a long silence
            # (``sync_server.retention``): the token still vouches for that key alone.
            session.add(Device(id=device_id, public_key=public_key))
            return False
        if session.get(Device, device_id) is not None:
            raise ApiError("enrollment_refused", "this device is already registered", 403)
        # Conditional: of two concurrent registrations with one token, one wins.
        taken = session.execute(update(EnrollmentToken).where(
            EnrollmentToken.token_sha256 == key, EnrollmentToken.used_at.is_(None))
            .values(used_at=utcnow(), device_id=device_id)).rowcount
        if taken != 1:
            raise refused
        session.add(Device(id=device_id, public_key=public_key))
    return False
