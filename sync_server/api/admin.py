"""Operator endpoints (``Authorization: Bearer <ADMIN_TOKEN>``): publish and list models,
staged rollout (percentage, pause, resume, rollback), evaluation metrics per version, open
and inspect rounds, read the server's public keys for provisioning."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import select

from sync_server.api import json_object, media_type
from sync_server.auth import admin_required
from sync_server.db import get_db
from sync_server.errors import ApiError
from sync_server.model_metrics import parse_metrics, record_metrics, version_metrics
from sync_server.models import ModelVersion
from sync_server.registry import (
    publish_bundle,
    rollback_version,
    rollout_percent,
    set_rollout,
    version_json,
)

bp = Blueprint("admin", __name__)


def _versions_json(rows: Sequence[ModelVersion]) -> list[dict[str, Any]]:
    """``version_json`` of each row with its stored metrics (one query for all of them)."""
    with get_db().session() as session:
        metrics = version_metrics(session, [r.version for r in rows])
    return [version_json(r, metrics.get(r.version)) for r in rows]


def _version_json(row: ModelVersion) -> dict[str, Any]:
    return _versions_json([row])[0]


@bp.get("/v1/admin/server-keys")
@admin_required
def server_keys() -> Response:
    return jsonify(current_app.extensions["pocketrec_keys"].public_json())


@bp.post("/v1/admin/models")
@admin_required
def publish() -> tuple[Response, int]:
    """Body: a bundle zip (application/zip or octet-stream), unsigned or signed by anyone.
    ``?rollout_percent=N`` (0-100, default 100) publishes it to that share of devices."""
    settings = current_app.config["POCKETREC"]
    # Bundles are far larger than anything a device sends: this endpoint has its own limit.
    request.max_content_length = settings["MAX_BUNDLE_BYTES"]
    media_type("application/zip", "application/octet-stream")
    ext = current_app.extensions
    row = publish_bundle(
        request.get_data(), db=get_db(), blobs=ext["pocketrec_blobs"],
        keys=ext["pocketrec_keys"], scratch_dir=Path(settings["DATA_DIR"]) / "tmp",
        max_bytes=settings["MAX_BUNDLE_BYTES"],
        percent=rollout_percent(request.args.get("rollout_percent", 100)),
    )
    return jsonify(_version_json(row)), 201


@bp.post("/v1/admin/models/<version:version>/rollout")
@admin_required
def rollout(version: int) -> Response:
    """Body: {"percent": 0-100}. Devices are chosen by a stable hash of version and device id,
    so raising the percentage only adds devices."""
    obj = json_object()
    if "percent" not in obj:
        raise ApiError("bad_rollout", 'body must be {"percent": 0-100}', 400)
    return jsonify(_version_json(set_rollout(get_db(), version,
                                             percent=rollout_percent(obj["percent"]))))


@bp.post("/v1/admin/models/<version:version>/pause")
@admin_required
def pause(version: int) -> Response:
    """Never serve this version again (until resumed). Devices that installed it keep it:
    they refuse older versions."""
    return jsonify(_version_json(set_rollout(get_db(), version, status="paused")))


@bp.post("/v1/admin/models/<version:version>/resume")
@admin_required
def resume(version: int) -> Response:
    return jsonify(_version_json(set_rollout(get_db(), version, status="published")))


@bp.post("/v1/admin/models/<version:version>/rollback")
@admin_required
def rollback(version: int) -> tuple[Response, int]:
    """Pause ``version`` and republish its parent's exact files as a new, higher version
    (devices enforce anti-rollback, so an old version number would be refused)."""
    ext = current_app.extensions
    paused, new = rollback_version(
        version, db=get_db(), blobs=ext["pocketrec_blobs"], keys=ext["pocketrec_keys"],
        scratch_dir=Path(current_app.config["POCKETREC"]["DATA_DIR"]) / "tmp")
    paused_json, new_json = _versions_json([paused, new])
    return jsonify({"paused": paused_json, "published": new_json}), 201


@bp.get("/v1/admin/models")
@admin_required
def list_models() -> Response:
    with get_db().session() as session:
        rows = session.scalars(select(ModelVersion).order_by(ModelVersion.version)).all()
    return jsonify({"models": _versions_json(rows)})


@bp.post("/v1/admin/models/<version:version>/metrics")
@admin_required
def post_metrics(version: int) -> tuple[Response, int]:
    """Body: {"metrics": {name: number, ...}, "source": "offline" | "online" | ...}: an
    evaluation job's numbers for this version (at most 32 per call); a later post of the
    same (source, name) replaces the value. 201 with the version and all its metrics."""
    source, metrics = parse_metrics(json_object())
    db = get_db()
    record_metrics(db, version, source, metrics)
    with db.session() as session:
        row = session.get(ModelVersion, version)
    return jsonify(_version_json(row)), 201


@bp.post("/v1/admin/rounds")
@admin_required
def open_round() -> tuple[Response, int]:
    """Body: the round config (``sync_server.round_config.RoundConfig``); 201 with its view."""
    return jsonify(current_app.extensions["pocketrec_rounds"].create(json_object())), 201


@bp.get("/v1/admin/rounds")
@admin_required
def list_rounds() -> Response:
    return jsonify(current_app.extensions["pocketrec_rounds"].list_rounds())


@bp.get("/v1/admin/rounds/<name:round_id>")
@admin_required
def get_round(round_id: str) -> Response:
    rounds = current_app.extensions["pocketrec_rounds"]
    rounds.advance(round_id)  # the deadline check: a GET may close (or fail) the round
    return jsonify(rounds.view(round_id))


@bp.post("/v1/admin/rounds/<name:round_id>/close-stage")
@admin_required
def close_stage(round_id: str) -> Response:
    """Stop waiting for the current stage: the round goes on with the devices that answered
    (as at the stage's deadline). For an operator who knows the rest will not come."""
    return jsonify(current_app.extensions["pocketrec_rounds"].close_stage(round_id))

