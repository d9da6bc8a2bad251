"""Every error is JSON ``{"error": {"code", "message"}}`` with a stable code.

Views raise ``ApiError`` (or a ``ProtocolError`` from device_sdk.protocol, which carries its
own status); Flask's own HTTP errors and unexpected exceptions are mapped here too, so no
response ever carries an HTML page or a traceback."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
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

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error", extra={"method": request.method, "path": request.path,
                                                "status": 500})
        return error_response("internal_error", "the server failed; see its log", 500)
