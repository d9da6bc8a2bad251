"""Operator endpoints (``Authorization: Bearer <ADMIN_TOKEN>``): publish and list models,
open and inspect rounds, read the server's public keys for provisioning."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import select

from sync_server.api import json_object
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


@bp.post("/v1/admin/rounds")
@admin_required
def open_round() -> tuple[Response, int]:
    """Body: the round config (``sync_server.rounds.ROUND_DEFAULTS``); 201 with its view."""
    return jsonify(current_app.extensions["pocketrec_rounds"].create(json_object())), 201


@bp.get("/v1/admin/rounds")
@admin_required
def list_rounds() -> Response:
    return jsonify(current_app.extensions["pocketrec_rounds"].list_rounds())


@bp.get("/v1/admin/rounds/<round_id>")
@admin_required
def get_round(round_id: str) -> Response:
    rounds = current_app.extensions["pocketrec_rounds"]
    rounds.advance(round_id)  # the deadline check: a GET may close (or fail) the round
    return jsonify(rounds.view(round_id))
