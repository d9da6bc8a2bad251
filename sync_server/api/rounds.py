"""Federated rounds. Until round orchestration lands, check-in never offers a task."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from sync_server.api import json_object
from sync_server.auth import device_required
from sync_server.errors import ApiError

bp = Blueprint("rounds", __name__)


@bp.post("/v1/rounds/checkin")
@device_required
def checkin() -> Response:
    obj = json_object()
    model_version, num_examples = obj.get("model_version"), obj.get("num_examples")
    if not (model_version is None or type(model_version) is int) or not (
        type(num_examples) is int and num_examples >= 0
    ):
        raise ApiError("bad_request", "model_version must be an int or null, num_examples "
                       "an int >= 0", 400)
    retry_after = current_app.config["POCKETREC"]["CHECKIN_RETRY_AFTER"]
    return jsonify({"task": None, "retry_after": retry_after})
