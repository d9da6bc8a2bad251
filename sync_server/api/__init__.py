"""HTTP resources, one blueprint per file; ``blueprints()`` is what the app registers."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, request
from werkzeug.routing import BaseConverter, IntegerConverter, Map

from device_sdk.protocol import NAME_PATTERN
from sync_server.errors import ApiError

# The largest model version: versions live in the database's INTEGER columns.
MAX_VERSION = 2**31 - 1


class NameConverter(BaseConverter):
    """``<name:round_id>``: a round id (the protocol's name pattern). Anything else, such as
    ``..``, a NUL byte or 200 characters, matches no route (404 ``not_found``) and never
    reaches a view or the database."""

    regex = NAME_PATTERN.pattern


class VersionConverter(IntegerConverter):
    """``<version:version>``: a model version, 0 .. MAX_VERSION; a larger number matches no
    route (404) instead of overflowing the database's integer."""

    def __init__(self, map: Map) -> None:
        super().__init__(map, max=MAX_VERSION)


CONVERTERS = {"name": NameConverter, "version": VersionConverter}


def json_object() -> dict[str, Any]:
    """The request body as a JSON object: 415 ``unsupported_media_type`` unless it is sent as
    application/json, 400 ``bad_request`` unless it is one (nesting too deep for the parser
    included)."""
    media_type("application/json")
    try:
        obj = json.loads(request.get_data(cache=True))
    except (ValueError, UnicodeDecodeError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        raise ApiError("bad_request", "body must be a JSON object", 400)
    return obj


def media_type(*accepted: str) -> None:
    """415 ``unsupported_media_type`` unless the request's Content-Type (parameters such as
    charset aside) is one of ``accepted``."""
    if request.mimetype not in accepted:
        given = request.mimetype or "none"
        raise ApiError("unsupported_media_type", f"Content-Type must be "
                       f"{' or '.join(accepted)}, got {given}", 415)


def octet_stream() -> bytes:
    """The raw body of a binary endpoint (a PRT1 frame, a sealed update)."""
    media_type("application/octet-stream")
    return request.get_data()


def blueprints() -> list[Blueprint]:
    from sync_server.api import (
        admin,
        dashboard,
        devices,
        enrollment,
        models,
        ops,
        retention,
        rounds,
    )

    return [devices.bp, models.bp, rounds.bp, admin.bp, enrollment.bp, retention.bp,
            dashboard.bp, ops.bp]
