"""Admin: run the retention sweep now (``sync_server.retention``)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from sync_server.auth import admin_required

bp = Blueprint("retention", __name__)


@bp.post("/v1/admin/retention/sweep")
@admin_required
def sweep() -> Response:
    """Delete what is past its retention now; answers the rows deleted per kind and the
    policy (the same sweep every worker runs every RETENTION_SWEEP_S)."""
    retention = current_app.extensions["pocketrec_retention"]
    return jsonify({"pruned": retention.sweep(), "policy": retention.policy()})
