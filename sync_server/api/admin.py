"""Operator endpoints (``Authorization: Bearer <ADMIN_TOKEN>``): publish and list models,
read the server's public keys for provisioning."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import select

from sync_server.auth import admin_required
from sync_server.db import get_db
from sync_server.models import ModelVersion
from sync_server.registry import publish_bundle, version_json

bp = Blueprint("admin", __name__)


@bp.get("/v1/admin/server-keys")
@admin_required
def server_keys() -> Response:
    return jsonify(current_app.extensions["pocketrec_keys"].public_json())


@bp.post("/v1/admin/models")
@admin_required
def publish() -> tuple[Response, int]:
    """Body: a bundle zip (application/zip or octet-stream), unsigned or signed by anyone."""
    settings = current_app.config["POCKETREC"]
    # Bundles are far larger than anything a device sends: this endpoint has its own limit.
    request.max_content_length = settings["MAX_BUNDLE_BYTES"]
    ext = current_app.extensions
    row = publish_bundle(
        request.get_data(), db=get_db(), blobs=ext["pocketrec_blobs"],
        keys=ext["pocketrec_keys"], scratch_dir=Path(settings["DATA_DIR"]) / "tmp",
        max_bytes=settings["MAX_BUNDLE_BYTES"],
    )
    return jsonify(version_json(row)), 201


@bp.get("/v1/admin/models")
@admin_required
def list_models() -> Response:
    with get_db().session() as session:
        rows = session.scalars(select(ModelVersion).order_by(ModelVersion.version)).all()
    return jsonify({"models": [version_json(r) for r in rows]})
