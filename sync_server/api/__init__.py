"""HTTP resources, one blueprint per file; ``BLUEPRINTS`` is what the app registers."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, request

from sync_server.errors import ApiError


def json_object() -> dict[str, Any]:
    """The request body as a JSON object, or 400 ``bad_request``."""
    try:
        obj = json.loads(request.get_data(cache=True))
    except (ValueError, UnicodeDecodeError):
        obj = None
    if not isinstance(obj, dict):
        raise ApiError("bad_request", "body must be a JSON object", 400)
    return obj


def blueprints() -> list[Blueprint]:
    from sync_server.api import admin, dashboard, devices, models, ops, rounds

    return [devices.bp, models.bp, rounds.bp, admin.bp, dashboard.bp, ops.bp]
