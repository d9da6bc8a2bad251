"""Device registration and the server's public keys."""

from __future__ import annotations

import base64
import binascii
import hmac

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy.exc import IntegrityError

from sync_server import attestation, enrollment
from sync_server.api import json_object
from sync_server.auth import check_rate_limit, verify_device_request
from sync_server.db import get_db
from sync_server.errors import ApiError
from sync_server.models import Device, EnrollmentToken
from sync_server.rate_limit import client_address

bp = Blueprint("devices", __name__)


@bp.get("/v1/server-keys")
def server_keys() -> Response:
    return jsonify(current_app.extensions["pocketrec_keys"].public_json())


@bp.post("/v1/devices")
def register() -> tuple[Response, int]:
    """Register the key that signs this very request (proof of possession); idempotent. A
    new key passes the attestation hook (``sync_server.attestation``) when one is set."""
    obj = json_object()
    try:
        public_key = base64.b64decode(str(obj.get("public_key")), validate=True)
    except (binascii.Error, ValueError):
        public_key = b""
    if len(public_key) != 32:
        raise ApiError("bad_request", "public_key must be 32 raw bytes, base64", 400)
    device_id = verify_device_request(public_key)
    check_rate_limit(device_id)
    with get_db().session() as session:
        new = session.get(Device, device_id) is None
    if new:  # before any enrollment token is used: a refused device spends none
        attestation.check(current_app.extensions["pocketrec_attestation"],
                          attestation.AttestationRequest(device_id, public_key,
                                                         obj.get("attestation"),
                                                         client_address()))
    settings = current_app.config["POCKETREC"]
    expected = settings["ENROLLMENT_TOKEN"]
    given = obj.get("enrollment_token")
    if settings["ENROLLMENT_MODE"] == "one-time":
        return _register_one_time(device_id, public_key, given)
    if expected is not None and not (
        isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())
    ):
        raise ApiError("enrollment_refused", "enrollment token is missing or not valid", 403)
    db = get_db()
    with db.session() as session:
        known = session.get(Device, device_id) is not None
    if not known:
        try:
            with db.transaction() as session:
                session.add(Device(id=device_id, public_key=public_key))
        except IntegrityError:
            known = True  # registered concurrently by a retry of this same request
    return jsonify({"device_id": device_id}), 200 if known else 201


def _register_one_time(device_id: str, public_key: bytes, token: object
                       ) -> tuple[Response, int]:
    db = get_db()
    try:
        known = enrollment.register_with_token(db, device_id, public_key, token)
    except (ApiError, IntegrityError):
        # A concurrent retry of this very registration may have won: then it is known.
        if not isinstance(token, str):
            raise
        with db.session() as session:
            row = session.get(EnrollmentToken, enrollment.digest(token))
        if row is None or row.device_id != device_id:
            raise
        known = True
    return jsonify({"device_id": device_id}), 200 if known else 201
