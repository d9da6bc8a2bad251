"""Federated rounds, device side: check-in (sampling), sealed update upload, and the SecAgg+
stages (poll, then one answer route per ``device_sdk.secagg.STAGES`` entry). The state
machine lives in ``sync_server.rounds``, the schemes in ``sync_server.upload_schemes``."""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, Response, current_app, g, jsonify

from device_sdk import secagg
from sync_server import fleet
from sync_server.api import json_object, octet_stream
from sync_server.auth import device_required
from sync_server.db import get_db
from sync_server.errors import ApiError
from sync_server.rounds import RoundService

bp = Blueprint("rounds", __name__)


def service() -> RoundService:
    return current_app.extensions["pocketrec_rounds"]


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
    fleet.note_version(get_db(), g.device_id, model_version)
    task = service().checkin(g.device_id, model_version)
    if task is None:
        retry_after = current_app.config["POCKETREC"]["CHECKIN_RETRY_AFTER"]
        return jsonify({"task": None, "retry_after": retry_after})
    return jsonify({"task": task})


@bp.post("/v1/rounds/<name:round_id>/update")
@device_required
def upload(round_id: str) -> tuple[Response, int]:
    return jsonify(service().accept_update(g.device_id, round_id, octet_stream())), 202


@bp.get("/v1/rounds/<name:round_id>/secagg")
@device_required
def secagg_poll(round_id: str) -> Response:
    return jsonify(service().secagg_poll(g.device_id, round_id))


def _answer(stage: secagg.Stage) -> Callable[[str], tuple[Response, int]]:
    """The view taking one SecAgg+ stage's answer (a JSON object or a PRT1 frame)."""

    @device_required
    def answer(round_id: str) -> tuple[Response, int]:
        body = octet_stream() if stage.media == "application/octet-stream" else json_object()
        return jsonify(service().secagg_answer(g.device_id, round_id, stage, body)), 202

    return answer


for _stage in secagg.STAGES:  # one route per stage, named by the stage table
    bp.add_url_rule(f"/v1/rounds/<name:round_id>/secagg/{_stage.path}",
                    endpoint=f"secagg_{_stage.path}", view_func=_answer(_stage),
                    methods=["POST"])
