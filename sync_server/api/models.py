"""Model distribution to devices: the current manifest (ETag) and bundle downloads."""

from __future__ import annotations

import hashlib

from flask import Blueprint, Response, current_app, g, request, send_file

from device_sdk.protocol import HEADER_MANIFEST_SIGNATURE, HEADER_MODEL_VERSION, b64
from sync_server.auth import device_required
from sync_server.db import get_db
from sync_server.errors import ApiError
from sync_server.models import ModelVersion
from sync_server.registry import serving_version

bp = Blueprint("models", __name__)


def manifest_etag(manifest: bytes) -> str:
    return '"' + hashlib.sha256(manifest).hexdigest()[:32] + '"'


def current_version(device_id: str) -> ModelVersion | None:
    """The version this device is offered (staged rollout: ``registry.serving_version``)."""
    with get_db().session() as session:
        return serving_version(session, device_id)


@bp.get("/v1/models/current")
@device_required
def current() -> Response:
    chosen = current_version(g.device_id)
    if chosen is None:
        raise ApiError("no_model", "no model is published yet", 404)
    etag = manifest_etag(chosen.manifest)
    tags = {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}
    if etag in tags or "*" in tags:
        return Response(status=304, headers={"ETag": etag})
    return Response(chosen.manifest, status=200, mimetype="application/json", headers={
        "ETag": etag,
        HEADER_MODEL_VERSION: str(chosen.version),
        HEADER_MANIFEST_SIGNATURE: b64(chosen.signature),
    })


@bp.get("/v1/models/<version:version>/bundle")
@device_required
def bundle(version: int) -> Response:
    with get_db().session() as session:
        row = session.get(ModelVersion, version)
    if row is None or row.status != "published":
        raise ApiError("no_model", f"no published model version {version}", 404)
    path = current_app.extensions["pocketrec_blobs"].path(row.blob_sha256)
    return send_file(path, mimetype="application/zip", max_age=0, conditional=False,
                     etag=False, download_name=f"pocketrec-model-{version}.zip")
