"""Admin: mint one-time enrollment tokens (``sync_server.enrollment``)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from sync_server import enrollment
from sync_server.api import json_object
from sync_server.auth import admin_required
from sync_server.db import get_db
from sync_server.errors import ApiError

bp = Blueprint("enrollment", __name__)


@bp.post("/v1/admin/enrollment-tokens")
@admin_required
def mint() -> tuple[Response, int]:
    """Body ``{"count": n}`` (1-1000): n fresh tokens, each registering one device."""
    count = json_object().get("count")
    if type(count) is not int or not 1 <= count <= enrollment.MAX_BATCH:
        raise ApiError("bad_request", f"count must be an integer in [1, "
                       f"{enrollment.MAX_BATCH}]", 400)
    tokens = enrollment.mint(get_db(), count)
    return jsonify({"tokens": tokens,
                    "mode": current_app.config["POCKETREC"]["ENROLLMENT_MODE"]}), 201
