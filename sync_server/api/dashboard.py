"""The operator dashboard: ``GET /dashboard`` (an HTML page, rendered from
``templates/dashboard.html``, with one static script that polls) and ``GET
/v1/admin/dashboard`` (the JSON it polls every 2 s; ``sync_server.dashboard``).

Both take the admin Bearer token or HTTP Basic credentials with the admin token as password
(``auth.admin_page_required``), so an operator's browser can log in. Both are read-only."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, make_response, render_template

from sync_server.auth import admin_page_required
from sync_server.dashboard import Dashboard

bp = Blueprint("dashboard", __name__)

POLL_INTERVAL_MS = 2000
# The page runs exactly one script, from this server; no inline script, no eval, no inline
# styles, no framing, no form posts, and fetch() only to this origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _dashboard() -> Dashboard:
    return current_app.extensions["pocketrec_dashboard"]


def _private(response: Response) -> Response:
    """Operator data: never cached, never sniffed, never read cross-origin."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.get("/v1/admin/dashboard")
@admin_page_required
def data() -> Response:
    """Rounds (newest 20, newest first), model versions with privacy and metrics, the privacy
    budget, the chart's series, generated_at."""
    return _private(jsonify(_dashboard().data()))


@bp.get("/dashboard")
@admin_page_required
def page() -> Response:
    response = make_response(render_template(
        "dashboard.html", data=_dashboard().data(), poll_interval_ms=POLL_INTERVAL_MS))
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Frame-Options"] = "DENY"
    return _private(response)
