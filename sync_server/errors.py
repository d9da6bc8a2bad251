"""Every error is JSON ``{"error": {"code", "message"}}`` with a stable code.

Views raise ``ApiError`` (or a ``ProtocolError`` from device_sdk.protocol, which carries its
own status); Flask's own HTTP errors and unexpected exceptions are mapped here too, so no
response ever carries an HTML page or a traceback."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

from device_sdk.protocol import ProtocolError, error_body

log = logging.getLogger(__name__)

# Werkzeug's status -> our stable code, for errors raised by Flask itself (routing, limits).
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}

# Retry-After of a 503 database_unavailable: a restarting PostgreSQL is usually back in seconds.
DATABASE_RETRY_AFTER_S = 5


class ApiError(ProtocolError):
    """A refusal with a stable ``code``, an HTTP ``status`` and optional extra headers."""

    def __init__(
        self, code: str, message: str, status: int, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(code, message, status)
        self.headers = dict(headers or {})


def error_response(
    code: str, message: str, status: int, headers: dict[str, str] | None = None
) -> Response:
    response = jsonify(error_body(code, message))
    response.status_code = status
    response.headers.update(headers or {})
    return response


def register_error_handlers(app: Flask) -> None:
    """Install the JSON handlers on ``app``."""

    @app.errorhandler(ProtocolError)
    def _protocol(exc: ProtocolError) -> Response:
        return error_response(exc.code, exc.message, exc.status, getattr(exc, "headers", None))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = HTTP_CODES.get(status, f"http_{status}")
        headers = {k: v for k, v in exc.get_headers() if k.lower() in ("allow", "retry-after")}
        if status == 404:
            message = f"no endpoint {request.path}"
        elif status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        elif status == 413:
            message = "request body is larger than this endpoint accepts"
        else:
            message = exc.description or exc.name
        return error_response(code, message, status, headers)

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    @app.errorhandler(DisconnectionError)
    @app.errorhandler(PoolTimeoutError)
    def _database_unavailable(exc: Exception) -> Response:
        # The database is down, restarting, unreachable or (SQLite) locked for longer than
        # the busy timeout: nothing was committed (the request's transaction rolled back), so
        # the client may simply try again. The pool re-checks connections (pre-ping), so the
        # server recovers by itself when the database is back.
        log.warning("database unavailable: %s", str(exc).splitlines()[0][:300],
                    extra={"method": request.method, "path": request.path, "status": 503})
        return error_response("database_unavailable", "the database is unavailable; retry "
                              "later", 503, {"Retry-After": str(DATABASE_RETRY_AFTER_S)})

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error", extra={"method": request.method, "path": request.path,
                                                "status": 500})
        return error_response("internal_error", "the server failed; see its log", 500)
