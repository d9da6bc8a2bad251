"""Operations: liveness with a database ping, Prometheus metrics, the OpenAPI document."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from device_sdk.protocol import error_body
from sync_server.db import get_db
from sync_server.openapi import openapi_document

bp = Blueprint("ops", __name__)
log = logging.getLogger(__name__)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    try:
        get_db().ping()
    except SQLAlchemyError as exc:
        log.warning("health check: database unreachable: %s", exc, extra={"status": 503})
        return jsonify(error_body("database_unavailable", "the database does not answer")), 503
    return jsonify({"status": "ok"}), 200


@bp.get("/metrics")
def metrics() -> Response:
    registry = current_app.extensions["pocketrec_metrics"].registry
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/v1/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())
